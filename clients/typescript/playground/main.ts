/** The playground page: Generate, Edit and Inpaint over Connect from the browser, with live progress and previews. */
import {
  Code,
  DenoisePass,
  ImageFormat,
  ModelState,
  SdserveError,
  Task as TaskKind,
  createBrowserClient,
  type FieldViolation,
  type Image,
  type ModelInfo,
  type ResultEvent,
  type SdserveEvent,
  type SdserveTransportClient,
} from "../src/browser.js";
import {
  $,
  FieldProblems,
  clearErrors,
  readImageOptions,
  readParams,
  recall,
  setSchedulers,
  showViolations,
  type Task,
} from "./form.js";
import { HistoryList, summary, type Entry } from "./history.js";
import { MaskPainter } from "./mask.js";

const KEY_STORAGE = "sdserve.apiKey";
/** The painted part on screen: magenta stands out on most images (the mask sent is white on black). */
const MASK_COLOUR = "#ff00ff";
/** Longest edge, in CSS pixels, the input image is shown at (small images are scaled up, pixelated). */
const INPUT_DISPLAY_EDGE = 384;
const TASKS: readonly Task[] = ["generate", "edit", "inpaint"];
const TASK_KINDS: Record<Task, TaskKind> = {
  generate: TaskKind.GENERATE,
  edit: TaskKind.EDIT,
  inpaint: TaskKind.INPAINT,
};
const MIME: Record<number, string> = {
  [ImageFormat.PNG]: "image/png",
  [ImageFormat.JPEG]: "image/jpeg",
  [ImageFormat.WEBP]: "image/webp",
};

/** An image this page holds as bytes: an upload or a result. */
interface Held {
  readonly bytes: Uint8Array;
  readonly type: string;
  readonly label: string;
}

function blobUrl(bytes: Uint8Array, type: string): string {
  // Copy into a fresh ArrayBuffer: a view into a larger (or shared) buffer is not a BlobPart everywhere.
  return URL.createObjectURL(new Blob([bytes.slice()], { type }));
}

function taskName(t: TaskKind): string {
  return (TaskKind[t] ?? String(t)).toLowerCase();
}

function readStoredKey(): string {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return ""; // storage disabled (private mode, file: pages): the key lasts for this page only
  }
}

function storeKey(key: string): void {
  try {
    if (key) {
      localStorage.setItem(KEY_STORAGE, key);
    } else {
      localStorage.removeItem(KEY_STORAGE);
    }
  } catch {
    // As above: nothing to keep it in.
  }
}

class Playground {
  private client: SdserveTransportClient;
  private models: ModelInfo[] = [];
  private controller: AbortController | null = null;
  private runs = 0;
  private input: (Held & { width: number; height: number }) | null = null;
  private inputUrl = "";
  private lastResult: Held | null = null;
  private previewUrl = "";
  private readonly painter: MaskPainter;
  private readonly history: HistoryList;
  private readonly baseUrl = new URL(".", location.href).href.replace(/\/$/, "");

  constructor() {
    const key = $<HTMLInputElement>("api-key");
    key.value = readStoredKey();
    this.client = this.makeClient();
    this.painter = new MaskPainter($<HTMLCanvasElement>("mask-canvas"), MASK_COLOUR, (share) => {
      $("mask-coverage").textContent = `${Math.round(share * 100)}% to repaint`;
      $("mask-canvas").dataset.share = share.toFixed(4);
    });
    this.history = new HistoryList($<HTMLOListElement>("history"), {
      recall: (entry) => {
        clearErrors();
        recall(entry.parameters);
      },
      useAsInput: (entry, index) => void this.useImage(entry.images[index], `${entry.task} result`),
    });
    this.wire(key);
  }

  private makeClient(): SdserveTransportClient {
    const apiKey = $<HTMLInputElement>("api-key").value.trim();
    return createBrowserClient(this.baseUrl, { apiKey: apiKey || undefined });
  }

  private wire(key: HTMLInputElement): void {
    key.addEventListener("change", () => {
      storeKey(key.value.trim());
      this.client = this.makeClient();
      void this.connect();
    });
    $<HTMLSelectElement>("model").addEventListener("change", () => this.modelChanged());
    for (const task of TASKS) {
      $(task).addEventListener("click", () => void this.run(task));
    }
    $("cancel").addEventListener("click", () => this.cancel());
    $("random-seed").addEventListener("click", () => {
      $<HTMLInputElement>("seed").value = "";
    });
    $("reuse-seed").addEventListener("click", () => {
      $<HTMLInputElement>("seed").value = $("seed-used").textContent ?? "";
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        void this.run("generate");
      }
    });
    $<HTMLInputElement>("image-file").addEventListener("change", (e) => void this.upload(e));
    $("use-last").addEventListener("click", () => {
      if (this.lastResult !== null) {
        void this.setInput(this.lastResult);
      }
    });
    const brush = $<HTMLInputElement>("brush");
    brush.addEventListener("input", () => this.setBrush(Number(brush.value)));
    $("invert-mask").addEventListener("click", () => this.painter.invert());
    $("clear-mask").addEventListener("click", () => this.painter.clear());
  }

  /** Loads the models and the server's description; asks for a key when the server wants one. */
  async connect(): Promise<void> {
    const info = $("server-info");
    info.textContent = "connecting…";
    document.body.dataset.ready = "false";
    try {
      const [models, server] = await Promise.all([this.client.listModels(), this.client.getServerInfo()]);
      this.setModels(models.models, models.defaultModel);
      setSchedulers(server.schedulers);
      const limits = server.limits;
      info.textContent =
        `sdserve ${server.version} · ${server.device} (${server.deviceName}) · ${server.dtype}` +
        (limits ? ` · up to ${limits.maxSize}px, ${limits.maxSteps} steps` : "");
      $("api-key").parentElement?.querySelector(".field-error")?.replaceChildren();
      document.body.dataset.ready = "true";
    } catch (reason) {
      const err = SdserveError.from(reason);
      info.textContent = "not connected";
      this.showError(err);
    }
  }

  private setModels(models: ModelInfo[], defaultModel: string): void {
    this.models = models;
    const select = $<HTMLSelectElement>("model");
    const keep = select.value || defaultModel;
    select.replaceChildren();
    for (const m of models) {
      const tasks = m.tasks.map(taskName).join(", ");
      const option = new Option(`${m.name} — ${m.family || "?"} · ${tasks}`, m.name);
      option.dataset.family = m.family;
      option.dataset.tasks = m.tasks.map(taskName).join(" ");
      select.add(option);
    }
    select.value = models.some((m) => m.name === keep) ? keep : (models[0]?.name ?? "");
    this.modelChanged();
  }

  private selectedModel(): ModelInfo | undefined {
    const name = $<HTMLSelectElement>("model").value;
    return this.models.find((m) => m.name === name);
  }

  private modelChanged(): void {
    const m = this.selectedModel();
    const info = $("model-info");
    if (m === undefined) {
      info.textContent = "";
    } else {
      const parts = [
        `family ${m.family || "unknown"}`,
        `tasks: ${m.tasks.map(taskName).join(", ")}`,
        `default ${m.defaultWidth}×${m.defaultHeight}`,
        m.variant,
        (ModelState[m.state] ?? "").toLowerCase().replace("_", " "),
      ];
      if (m.inpaintModel) {
        parts.push(`inpaints with ${m.inpaintModel}`);
      }
      if (m.aliases.length > 0) {
        parts.push(`aliases: ${m.aliases.join(", ")}`);
      }
      info.textContent = parts.filter(Boolean).join(" · ") + (m.description ? `\n${m.description}` : "");
      info.title = m.error;
      $<HTMLInputElement>("width").placeholder = String(m.defaultWidth || "default");
      $<HTMLInputElement>("height").placeholder = String(m.defaultHeight || "default");
    }
    this.setBusy(this.controller !== null);
  }

  private setBusy(busy: boolean): void {
    const tasks = this.selectedModel()?.tasks ?? [];
    for (const task of TASKS) {
      const button = $<HTMLButtonElement>(task);
      const able = tasks.includes(TASK_KINDS[task]);
      button.disabled = busy || !able;
      button.title = able ? "" : `${$<HTMLSelectElement>("model").value || "this model"} cannot ${task}`;
    }
    $<HTMLButtonElement>("cancel").disabled = !busy;
  }

  private setStatus(state: string, text: string): void {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  private setBrush(size: number): void {
    this.painter.brush = size;
    $<HTMLInputElement>("brush").value = String(size);
    $("brush-value").textContent = `${size} px`;
  }

  private async upload(e: Event): Promise<void> {
    const file = (e.target as HTMLInputElement).files?.[0];
    if (file !== undefined) {
      await this.setInput({ bytes: new Uint8Array(await file.arrayBuffer()), type: file.type, label: file.name });
    }
  }

  private async useImage(image: Image | undefined, label: string): Promise<void> {
    if (image !== undefined) {
      await this.setInput({ bytes: image.data, type: MIME[image.format] ?? "image/png", label });
    }
  }

  /** Shows `held` as the input image; a new size starts a new (black) mask, the same size keeps the painted one. */
  private async setInput(held: Held): Promise<void> {
    clearErrors();
    const img = $<HTMLImageElement>("input-image");
    const url = blobUrl(held.bytes, held.type);
    img.src = url;
    try {
      await img.decode();
    } catch {
      URL.revokeObjectURL(url);
      showViolations([{ field: "image", description: `${held.label}: this browser cannot decode the image` }]);
      return;
    }
    if (this.inputUrl) {
      URL.revokeObjectURL(this.inputUrl);
    }
    this.inputUrl = url;
    const { naturalWidth: w, naturalHeight: h } = img;
    if (w !== this.painter.width || h !== this.painter.height) {
      this.painter.reset(w, h);
      const brush = $<HTMLInputElement>("brush");
      brush.max = String(Math.max(8, Math.round(Math.max(w, h) / 2)));
      this.setBrush(Math.max(1, Math.round(Math.max(w, h) / 10)));
    }
    img.style.width = `${Math.round((w * INPUT_DISPLAY_EDGE) / Math.max(w, h))}px`;
    const wrap = $("canvas-wrap");
    wrap.hidden = false;
    wrap.dataset.width = String(w);
    wrap.dataset.height = String(h);
    $("input-info").textContent = `${w}×${h} · ${held.label}`;
    this.input = { ...held, width: w, height: h };
  }

  private cancel(): void {
    if (this.controller !== null) {
      this.setStatus("cancelling", "Cancelling…");
      this.controller.abort();
    }
  }

  /** Opens the task's stream; throws FieldProblems for what the form cannot send. */
  private async open(task: Task, signal: AbortSignal): Promise<AsyncIterable<SdserveEvent>> {
    const problems: FieldViolation[] = [];
    let params;
    try {
      params = readParams();
    } catch (e) {
      if (!(e instanceof FieldProblems)) throw e;
      problems.push(...e.violations);
    }
    let options = { strength: undefined as number | undefined, maskBlur: 0 };
    if (task !== "generate") {
      try {
        options = readImageOptions();
      } catch (e) {
        if (!(e instanceof FieldProblems)) throw e;
        problems.push(...e.violations);
      }
      if (this.input === null) {
        problems.push({ field: "image", description: "upload an image or use the last result first" });
      }
      if (task === "inpaint" && this.input !== null && this.painter.share() === 0) {
        problems.push({ field: "mask", description: "paint the part to repaint first (white in the mask)" });
      }
    }
    if (problems.length > 0 || params === undefined) {
      throw new FieldProblems(problems);
    }
    if (task === "generate") {
      return this.client.streamGenerate({ params }, { signal });
    }
    const image = this.input!.bytes;
    if (task === "edit") {
      return this.client.streamEdit({ params, image, strength: options.strength }, { signal });
    }
    const mask = await this.painter.png();
    this.showMaskSent();
    return this.client.streamInpaint(
      {
        params,
        image,
        mask,
        maskBlur: options.maskBlur,
        strength: options.strength,
        preserveUnmasked: $<HTMLInputElement>("preserve-unmasked").checked,
      },
      { signal },
    );
  }

  /** The mask of the last Inpaint request, as sent: a thumbnail, its size and the share to repaint. */
  private showMaskSent(): void {
    const img = $<HTMLImageElement>("last-mask");
    img.src = this.painter.dataUrl();
    img.dataset.width = String(this.painter.width);
    img.dataset.height = String(this.painter.height);
    img.dataset.share = this.painter.share().toFixed(4);
    $("last-request").hidden = false;
  }

  async run(task: Task): Promise<void> {
    // A disabled button (busy, or a task the model lacks) also stops Ctrl+Enter.
    if (this.controller !== null || $<HTMLButtonElement>(task).disabled) {
      return;
    }
    // Numbered so that whoever watches the page (a person, a test) can tell this run's outcome from the last one's.
    this.runs += 1;
    $("status").dataset.run = String(this.runs);
    this.setStatus("preparing", "Preparing…");
    clearErrors();
    const controller = new AbortController();
    let stream: AsyncIterable<SdserveEvent>;
    try {
      stream = await this.open(task, controller.signal);
    } catch (e) {
      if (e instanceof FieldProblems) {
        this.placeErrors(e.violations);
        this.setStatus("error", "Fix the marked fields");
        return;
      }
      throw e;
    }
    this.controller = controller;
    this.setBusy(true);
    this.resetProgress();
    this.setStatus("queued", "Sending…");
    $("preview").dataset.shown = "0";
    delete $("status").dataset.requestId;
    const startedAt = performance.now();
    let result: ResultEvent | undefined;
    try {
      for await (const event of stream) {
        if (event.case === "result") {
          result = event.value;
        } else {
          this.onEvent(event);
        }
      }
      if (result !== undefined) {
        this.finish(task, result, (performance.now() - startedAt) / 1000);
      }
    } catch (reason) {
      const err = SdserveError.from(reason);
      if (controller.signal.aborted || err.code === Code.Canceled) {
        this.setStatus("cancelled", "Cancelled");
      } else {
        this.showError(err);
      }
    } finally {
      this.hidePreview();
      this.controller = null;
      this.setBusy(false);
    }
  }

  private resetProgress(): void {
    const bar = $<HTMLProgressElement>("progress");
    bar.max = 1;
    bar.value = 0;
    bar.dataset.step = "0";
    bar.dataset.total = "0";
    $("progress-text").textContent = "\u00a0";
  }

  private onEvent(event: Exclude<SdserveEvent, { case: "result" }>): void {
    switch (event.case) {
      case "queued":
        this.setStatus("queued", event.value.position > 0 ? `Queued (${event.value.position} ahead)` : "Queued");
        break;
      case "started": {
        const s = event.value;
        this.setStatus("running", `Running on ${s.model}`);
        $("status").dataset.requestId = s.requestId;
        $("status").title = `request id ${s.requestId}`;
        $("seed-used").textContent = s.seeds[0]?.toString() ?? "";
        $("seed-row").hidden = s.seeds.length === 0;
        break;
      }
      case "progress": {
        const p = event.value;
        const bar = $<HTMLProgressElement>("progress");
        bar.max = Math.max(1, p.totalSteps);
        bar.value = p.step;
        bar.dataset.step = String(p.step);
        bar.dataset.total = String(p.totalSteps);
        const pass = p.denoisePass === DenoisePass.REFINER ? " (refiner)" : "";
        $("progress-text").textContent = `step ${p.step} / ${p.totalSteps}${pass}`;
        if (this.controller?.signal.aborted !== true) {
          this.setStatus("running", `Running${pass}`);
        }
        const preview = p.previews[0];
        if (preview !== undefined) {
          this.showPreview(preview.data, MIME[preview.format] ?? "image/jpeg");
        }
        break;
      }
    }
  }

  private showPreview(data: Uint8Array, type: string): void {
    const img = $<HTMLImageElement>("preview");
    const url = blobUrl(data, type);
    img.src = url;
    img.hidden = false;
    img.dataset.shown = String(Number(img.dataset.shown ?? "0") + 1);
    $("results").hidden = true;
    if (this.previewUrl) {
      URL.revokeObjectURL(this.previewUrl);
    }
    this.previewUrl = url;
  }

  private hidePreview(): void {
    $("preview").hidden = true;
    $("results").hidden = false;
    if (this.previewUrl) {
      URL.revokeObjectURL(this.previewUrl);
      this.previewUrl = "";
    }
  }

  private finish(task: Task, result: ResultEvent, seconds: number): void {
    const parameters = result.parameters;
    if (parameters === undefined) {
      this.setStatus("error", "The server sent a result without its parameters");
      return;
    }
    const urls = result.images.map((image) => blobUrl(image.data, MIME[image.format] ?? "image/png"));
    const mask = task === "inpaint" ? $<HTMLImageElement>("last-mask").src : undefined;
    const entry: Entry = { task, parameters, images: result.images, urls, mask, seconds };
    const figures = result.images.map((image, i) => this.figure(entry, image, i));
    $("results").replaceChildren(...figures);
    const first = result.images[0];
    if (first !== undefined) {
      this.lastResult = { bytes: first.data, type: MIME[first.format] ?? "image/png", label: `last ${task} result` };
      $<HTMLButtonElement>("use-last").disabled = false;
    }
    const bar = $<HTMLProgressElement>("progress");
    bar.value = bar.max;
    $("seed-used").textContent = parameters.seed.toString();
    $("seed-row").hidden = false;
    const t = result.timings;
    $("timings").textContent = t
      ? `${summary(task, parameters)} · total ${t.totalSeconds.toFixed(2)} s (queue ${t.queueSeconds.toFixed(2)}, ` +
        `denoise ${t.denoiseSeconds.toFixed(2)}, decode ${t.decodeSeconds.toFixed(2)})`
      : summary(task, parameters);
    this.history.add(entry);
    this.setStatus("done", `Done in ${seconds.toFixed(2)} s`);
  }

  private figure(entry: Entry, image: Image, index: number): HTMLElement {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "result-image";
    img.src = entry.urls[index] ?? "";
    img.alt = `${entry.task} result ${index + 1}`;
    img.dataset.seed = image.seed.toString();
    img.dataset.width = String(image.width);
    img.dataset.height = String(image.height);
    const caption = document.createElement("figcaption");
    const text = document.createElement("span");
    text.textContent = `seed ${image.seed} · ${image.width}×${image.height}`;
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = "Use as input";
    use.addEventListener("click", () => void this.useImage(image, `${entry.task} result, seed ${image.seed}`));
    caption.append(text, use);
    figure.append(img, caption);
    return figure;
  }

  /** Field problems next to their fields; the rest in the general error line. */
  private placeErrors(violations: readonly FieldViolation[]): void {
    const unplaced = showViolations(violations);
    for (const v of unplaced) {
      const line = document.createElement("div");
      line.textContent = `${v.field}: ${v.description}`;
      $("error").append(line);
    }
  }

  private showError(err: SdserveError): void {
    if (err.code === Code.Unauthenticated) {
      showViolations([{ field: "api_key", description: `${err.rawMessage} (enter the server's API key)` }]);
      this.setStatus("error", "Needs an API key");
      return;
    }
    this.placeErrors(err.fieldViolations);
    if (err.fieldViolations.length === 0) {
      const retry = err.retryDelayMs !== undefined ? ` (retry in ${(err.retryDelayMs / 1000).toFixed(1)} s)` : "";
      const line = document.createElement("div");
      line.textContent = `${err.codeName}: ${err.rawMessage}${retry}`;
      $("error").append(line);
    }
    this.setStatus("error", `Failed: ${err.codeName}`);
  }
}

const playground = new Playground();
void playground.connect();
