/** The form: reads the fields into request parameters, recalls past parameters, shows errors next to fields. */
import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  PreviewMode,
  Scheduler,
  type FieldViolation,
  type GenerationParamsSchema,
  type ResolvedParameters,
} from "../src/browser.js";

/** The element with this id, which the page must have. */
export function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (el === null) {
    throw new Error(`the page has no #${id}`);
  }
  return el as T;
}

export type ParamsInit = MessageInitShape<typeof GenerationParamsSchema>;
export type Task = "generate" | "edit" | "inpaint";

/** Field problems found before any call, named as the server names them (`params.width`, `strength`, ...). */
export class FieldProblems extends Error {
  constructor(readonly violations: FieldViolation[]) {
    super(violations.map((v) => `${v.field}: ${v.description}`).join("; "));
  }
}

const UINT32_MAX = 4294967295;
const UINT64_MAX = (1n << 64n) - 1n;

/** Scheduler labels for the picker; a scheduler this page does not know shows its enum name. */
const SCHEDULER_LABELS: Partial<Record<Scheduler, string>> = {
  [Scheduler.DDIM]: "DDIM",
  [Scheduler.PNDM]: "PNDM (PLMS)",
  [Scheduler.DDPM]: "DDPM",
  [Scheduler.LMS]: "LMS",
  [Scheduler.EULER]: "Euler",
  [Scheduler.EULER_ANCESTRAL]: "Euler ancestral",
  [Scheduler.HEUN]: "Heun",
  [Scheduler.DPMPP_2M]: "DPM++ 2M",
  [Scheduler.DPMPP_2M_KARRAS]: "DPM++ 2M Karras",
  [Scheduler.UNIPC]: "UniPC",
  [Scheduler.LCM]: "LCM",
};

export function schedulerLabel(s: Scheduler): string {
  return SCHEDULER_LABELS[s] ?? Scheduler[s] ?? `scheduler ${s}`;
}

/** Fills the scheduler picker with the server's schedulers (after "model default"). */
export function setSchedulers(schedulers: readonly Scheduler[]): void {
  const select = $<HTMLSelectElement>("scheduler");
  const keep = select.value;
  select.replaceChildren(new Option("model default", "0"));
  for (const s of schedulers) {
    select.add(new Option(schedulerLabel(s), String(s)));
  }
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "0";
}

/** Reads a form's fields, collecting each bad one as a field violation. */
class Reader {
  readonly violations: FieldViolation[] = [];

  private input(id: string): HTMLInputElement {
    return $<HTMLInputElement>(id);
  }

  /** A whole number from 0 to 2^32-1; empty is `empty`. */
  uint(id: string, field: string, empty = 0): number {
    const el = this.input(id);
    const text = el.value.trim();
    if (el.validity.badInput) {
      this.violations.push({ field, description: "must be a whole number" });
      return empty;
    }
    if (text === "") {
      return empty;
    }
    const value = Number(text);
    if (!Number.isInteger(value) || value < 0 || value > UINT32_MAX) {
      this.violations.push({ field, description: `must be a whole number from 0 to ${UINT32_MAX}; got ${text}` });
      return empty;
    }
    return value;
  }

  /** A finite number; empty is undefined (the server's default). */
  float(id: string, field: string): number | undefined {
    const el = this.input(id);
    const text = el.value.trim();
    if (el.validity.badInput || (text !== "" && !Number.isFinite(Number(text)))) {
      this.violations.push({ field, description: "must be a number" });
      return undefined;
    }
    return text === "" ? undefined : Number(text);
  }

  /** A uint64 seed; empty is undefined (the server picks one). */
  seed(id: string, field: string): bigint | undefined {
    const text = this.input(id).value.trim();
    if (text === "") {
      return undefined;
    }
    if (!/^\d+$/.test(text) || BigInt(text) > UINT64_MAX) {
      this.violations.push({ field, description: `must be a whole number from 0 to ${UINT64_MAX}; got ${text}` });
      return undefined;
    }
    return BigInt(text);
  }
}

/** The GenerationParams of the form; throws FieldProblems naming every field it cannot read. */
export function readParams(): ParamsInit {
  const r = new Reader();
  const params: ParamsInit = {
    model: $<HTMLSelectElement>("model").value,
    prompt: $<HTMLTextAreaElement>("prompt").value,
    negativePrompt: $<HTMLTextAreaElement>("negative-prompt").value,
    width: r.uint("width", "params.width"),
    height: r.uint("height", "params.height"),
    steps: r.uint("steps", "params.steps"),
    guidanceScale: r.float("guidance", "params.guidance_scale"),
    scheduler: Number($<HTMLSelectElement>("scheduler").value) as Scheduler,
    seed: r.seed("seed", "params.seed"),
    numImages: r.uint("num-images", "params.num_images", 1),
  };
  if ($<HTMLInputElement>("previews").checked) {
    params.preview = { mode: PreviewMode.LATENT_RGB, everyNSteps: 1 };
  }
  if (r.violations.length > 0) {
    throw new FieldProblems(r.violations);
  }
  return params;
}

/** Edit's and Inpaint's own numbers: strength (empty: the server's default) and the mask blur. */
export function readImageOptions(): { strength: number | undefined; maskBlur: number } {
  const r = new Reader();
  const strength = r.float("strength", "strength");
  const maskBlur = r.uint("mask-blur", "mask_blur");
  if (r.violations.length > 0) {
    throw new FieldProblems(r.violations);
  }
  return { strength, maskBlur };
}

/** Shortest decimal of a float32 the server echoed (7.5, 0.35), as a person would type it. */
function decimal(value: number): string {
  return String(Number(value.toPrecision(6)));
}

/** Puts a past request's resolved parameters back into the form. */
export function recall(p: ResolvedParameters): void {
  const model = $<HTMLSelectElement>("model");
  if ([...model.options].some((o) => o.value === p.model)) {
    model.value = p.model;
    model.dispatchEvent(new Event("change"));
  }
  $<HTMLTextAreaElement>("prompt").value = p.prompt;
  $<HTMLTextAreaElement>("negative-prompt").value = p.negativePrompt;
  $<HTMLInputElement>("width").value = String(p.width);
  $<HTMLInputElement>("height").value = String(p.height);
  $<HTMLInputElement>("steps").value = String(p.steps);
  $<HTMLInputElement>("guidance").value = decimal(p.guidanceScale);
  const scheduler = $<HTMLSelectElement>("scheduler");
  if (![...scheduler.options].some((o) => o.value === String(p.scheduler))) {
    scheduler.add(new Option(schedulerLabel(p.scheduler), String(p.scheduler)));
  }
  scheduler.value = String(p.scheduler);
  $<HTMLInputElement>("seed").value = p.seed.toString();
  $<HTMLInputElement>("num-images").value = String(p.numImages || 1);
  if (p.strength > 0) {
    $<HTMLInputElement>("strength").value = decimal(p.strength);
  }
  $<HTMLInputElement>("mask-blur").value = String(p.maskBlur);
}

/** The error slot of `field`: its own, or its nearest parent's (`params.preview.max_edge` has none of its own). */
function slotFor(field: string): HTMLElement | null {
  for (let path = field; path !== ""; path = path.includes(".") ? path.slice(0, path.lastIndexOf(".")) : "") {
    const slot = document.querySelector<HTMLElement>(`.field-error[data-field="${CSS.escape(path)}"]`);
    if (slot !== null && path !== "params") {
      return slot;
    }
  }
  return null;
}

/** Shows each violation next to its field; returns those no field on the page shows. */
export function showViolations(violations: readonly FieldViolation[]): FieldViolation[] {
  const unplaced: FieldViolation[] = [];
  for (const v of violations) {
    const slot = slotFor(v.field);
    if (slot === null) {
      unplaced.push(v);
      continue;
    }
    const line = document.createElement("div");
    line.textContent = slot.dataset.field === v.field ? v.description : `${v.field}: ${v.description}`;
    slot.append(line);
    const control = slot.dataset.for
      ? document.getElementById(slot.dataset.for)
      : slot.parentElement?.querySelector("input, select, textarea");
    control?.classList.add("invalid");
  }
  return unplaced;
}

/** Clears every field error and the general error line. */
export function clearErrors(): void {
  for (const slot of document.querySelectorAll<HTMLElement>(".field-error")) {
    slot.replaceChildren();
  }
  for (const el of document.querySelectorAll(".invalid")) {
    el.classList.remove("invalid");
  }
  $("error").replaceChildren();
}
