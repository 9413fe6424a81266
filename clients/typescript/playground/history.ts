/** The history of results on this page: each entry keeps its images and resolved parameters for recall. */
import { Scheduler, type Image, type ResolvedParameters } from "../src/browser.js";
import { schedulerLabel, type Task } from "./form.js";

/** One finished request. */
export interface Entry {
  readonly task: Task;
  readonly parameters: ResolvedParameters;
  readonly images: readonly Image[];
  /** Object URLs of `images`, in order. */
  readonly urls: readonly string[];
  /** The mask sent (Inpaint), as a data: URL. */
  readonly mask: string | undefined;
  readonly seconds: number;
}

/** What an entry's buttons do. */
export interface EntryActions {
  recall(entry: Entry): void;
  useAsInput(entry: Entry, index: number): void;
}

/** Most entries kept; older ones are dropped with their object URLs. */
const MAX_ENTRIES = 30;

/** One line describing a request's parameters, as the history and the result captions show them. */
export function summary(task: Task, p: ResolvedParameters): string {
  const scheduler = p.scheduler === Scheduler.UNSPECIFIED ? "" : ` · ${schedulerLabel(p.scheduler)}`;
  const strength = task === "generate" ? "" : ` · strength ${Number(p.strength.toPrecision(3))}`;
  return (
    `${task} · ${p.model} · ${p.width}×${p.height} · ${p.steps} steps · guidance ${Number(p.guidanceScale.toPrecision(4))}` +
    `${scheduler}${strength} · seed ${p.seed}`
  );
}

export class HistoryList {
  private readonly entries: { entry: Entry; item: HTMLLIElement }[] = [];

  constructor(
    private readonly list: HTMLOListElement,
    private readonly actions: EntryActions,
  ) {}

  add(entry: Entry): void {
    const item = document.createElement("li");
    item.className = "history-entry";
    item.dataset.task = entry.task;
    item.dataset.seed = entry.parameters.seed.toString();
    const thumb = document.createElement("img");
    thumb.src = entry.urls[0] ?? "";
    thumb.alt = `${entry.task} result`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = entry.parameters.prompt || "(no prompt)";
    prompt.title = entry.parameters.prompt;
    const line = document.createElement("div");
    line.className = "muted small";
    const images = entry.images.length > 1 ? ` · ${entry.images.length} images` : "";
    line.textContent = `${summary(entry.task, entry.parameters)}${images} · ${entry.seconds.toFixed(2)} s`;
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    buttons.append(
      button("Recall", "recall", "Put these parameters back into the form", () => this.actions.recall(entry)),
      button("Use as input", "use-input", "Use this image for Edit and Inpaint", () =>
        this.actions.useAsInput(entry, 0),
      ),
    );
    meta.append(prompt, line, buttons);
    item.append(thumb, meta);
    if (entry.mask !== undefined) {
      const mask = document.createElement("img");
      mask.src = entry.mask;
      mask.alt = "mask sent";
      mask.title = "mask sent (white: repainted)";
      item.append(mask);
    }
    this.list.prepend(item);
    this.entries.unshift({ entry, item });
    for (const old of this.entries.splice(MAX_ENTRIES)) {
      old.item.remove();
      old.entry.urls.forEach((url) => URL.revokeObjectURL(url));
    }
  }
}

function button(text: string, action: string, title: string, onClick: () => void): HTMLButtonElement {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.dataset.action = action;
  b.addEventListener("click", onClick);
  return b;
}
