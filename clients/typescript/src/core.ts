/** SdserveTransportClient: the typed DiffusionService calls over any Connect transport (Node or browser). */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  createClient,
  type CallOptions as ConnectCallOptions,
  type Client,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import {
  DiffusionService,
  EditRequestSchema,
  GenerateRequestSchema,
  InpaintRequestSchema,
  ResolvedParametersSchema,
  TimingsSchema,
  type GenerateResponse,
  type GetServerInfoResponse,
  type Image,
  type ListModelsResponse,
  type ResolvedAdapter,
  type ResolvedParameters,
  type StartedEvent,
  type Timings,
} from "./gen/sdserve/v1/diffusion_pb.js";
import { Code, SdserveError, type FieldViolation } from "./errors.js";

/** 64 MiB: result images exceed gRPC's customary 4 MiB; the server's own default limit is 64 MiB. */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * A Generate request as a plain object, e.g. `{ params: { prompt: "a cat", steps: 20, seed: 42n } }`.
 * SDXL's fields go in `params` too: `prompt2`, `negativePrompt2`, `conditioning` (micro-conditioning)
 * and `refiner` (a second pass), e.g. `refiner: { model: "sdxl-refiner", switchAt: 0.8 }`.
 * LoRA adapters for this request only go in `params.adapters`, e.g. `adapters: [{ name: "pink", scale: 0.8 }]`
 * (see {@link AdapterInput}; checked by {@link checkAdapters} before the call).
 */
export type GenerateInput = MessageInitShape<typeof GenerateRequestSchema>;
/** An Edit request as a plain object; `image` holds PNG, JPEG or WebP bytes. */
export type EditInput = MessageInitShape<typeof EditRequestSchema>;
/** An Inpaint request as a plain object; white (255) in `mask` means "repaint". */
export type InpaintInput = MessageInitShape<typeof InpaintRequestSchema>;

/** The bounds of an adapter's scale: -MAX_ADAPTER_SCALE to MAX_ADAPTER_SCALE. */
export const MAX_ADAPTER_SCALE = 4;

/**
 * The interceptors of a client: one that sends `authorization: Bearer <apiKey>` when a key is given (as the server's
 * API keys expect, on gRPC and HTTP alike), then `extra` in order.
 */
export function withApiKey(apiKey: string | undefined, extra: readonly Interceptor[] = []): Interceptor[] {
  const interceptors: Interceptor[] = [];
  if (apiKey) {
    interceptors.push((next) => (req) => {
      req.header.set("authorization", `Bearer ${apiKey}`);
      return next(req);
    });
  }
  return [...interceptors, ...extra];
}

/**
 * One LoRA for a request, an entry of `params.adapters`: its name (as `getServerInfo().adapters` lists it) and
 * `scale`, -4 to 4 (absent: 1). At most the server's `limits.maxAdapters` per request, each name once.
 */
export interface AdapterInput {
  name: string;
  scale?: number;
}

/**
 * Checks `params.adapters` as the contract states: a non-empty name, each name once, a finite scale from -4 to 4.
 * Throws SdserveError INVALID_ARGUMENT with one field violation per bad field (`params.adapters[1].name`, ...).
 * streamGenerate, streamEdit and streamInpaint (and so generate, edit and inpaint) call it before any call.
 */
export function checkAdapters(adapters: readonly { name?: string; scale?: number }[] | undefined): void {
  const violations: FieldViolation[] = [];
  const seen = new Map<string, number>();
  (adapters ?? []).forEach((adapter, i) => {
    const name = adapter.name ?? "";
    if (name.trim() === "") {
      violations.push({ field: `params.adapters[${i}].name`, description: "must not be empty" });
    } else if (seen.has(name)) {
      violations.push({
        field: `params.adapters[${i}].name`,
        description: `"${name}" is already params.adapters[${seen.get(name)}] (each adapter once)`,
      });
    } else {
      seen.set(name, i);
    }
    const scale = adapter.scale;
    if (scale !== undefined && !(Number.isFinite(scale) && Math.abs(scale) <= MAX_ADAPTER_SCALE)) {
      violations.push({
        field: `params.adapters[${i}].scale`,
        description: `must be a finite number from -${MAX_ADAPTER_SCALE} to ${MAX_ADAPTER_SCALE}, got ${scale}`,
      });
    }
  });
  const first = violations[0];
  if (first !== undefined) {
    throw new SdserveError(Code.InvalidArgument, `${first.field}: ${first.description}`, {
      fieldViolations: violations,
    });
  }
}

/**
 * One event of a Generate, Edit or Inpaint stream, in stream order: `queued`, `started`,
 * zero or more `progress` (steps 1..totalSteps, with previews when asked for), then `result`.
 * Switch on `event.case`; `event.value` is typed accordingly.
 */
export type SdserveEvent = Exclude<GenerateResponse["event"], { case: undefined }>;

/** What `generate`, `edit` and `inpaint` resolve to. */
export interface GenerationResult {
  /** The result images, in index order. */
  readonly images: readonly Image[];
  /** The parameters the request actually ran with (defaults filled in; with SDXL, `refiner` and `conditioning`). */
  readonly parameters: ResolvedParameters;
  /** Where the time went, in seconds. */
  readonly timings: Timings;
  /** The request id (the caller's, or one the server made). */
  readonly requestId: string;
  /** The `started` event (seeds, model, revision, refiner, memory strategy, adapters, queue time), when sent. */
  readonly started: StartedEvent | undefined;
  /**
   * The adapters the request ran with (`parameters.adapters`): LoRAs with their scales and the embeddings the
   * prompts used, sorted by name, each with its kind and its weights' SHA-256.
   */
  readonly adapters: readonly ResolvedAdapter[];
  /**
   * The execution profile it ran in (`parameters.executionProfile`): `exact`, or levers joined by `+` such as
   * `bf16-autocast+channels-last`. Ask for `params.precision: Precision.EXACT` to get the exact pipeline.
   */
  readonly executionProfile: string;
  /**
   * The replica (server process) that served it (`parameters.replica`): the server's `replica` setting, by default
   * its host name (the pod name in Kubernetes); "" from servers before fleets. See docs/fleet.md.
   */
  readonly replica: string;
}

/** Per-call options. */
export interface CallOptions {
  /** Aborting cancels the call: the server stops within one step and the call rejects with CANCELLED. */
  signal?: AbortSignal;
  /** Deadline in milliseconds from now; the server sees it as grpc-timeout. Overrides the client default. */
  timeoutMs?: number;
  /** Extra request metadata. */
  headers?: ConnectCallOptions["headers"];
}

/** Per-call options of generate/edit/inpaint, which can also observe the events on the way. */
export interface GenerationCallOptions extends CallOptions {
  /** Called for every event before the result resolves (e.g. to show progress or previews). */
  onEvent?: (event: SdserveEvent) => void;
}

/**
 * sdserve's DiffusionService calls over a Connect `Transport` of the caller's choosing: connect-node's gRPC
 * transport (what SdserveClient makes from an address), or connect-web's Connect / gRPC-Web transport in a
 * browser (`createBrowserClient` in `@sdserve/client/browser`). API keys, deadlines and message limits are the
 * transport's options.
 */
export class SdserveTransportClient {
  /** The generated Connect client, for anything the wrapper does not cover. */
  readonly raw: Client<typeof DiffusionService>;

  constructor(transport: Transport) {
    this.raw = createClient(DiffusionService, transport);
  }

  /**
   * Text-to-image; streams every event. Iterating rejects with SdserveError on failure (bad `params.adapters`
   * before any call, see checkAdapters); leaving the loop early (`break`) cancels the call.
   */
  streamGenerate(request: GenerateInput, options: CallOptions = {}): AsyncIterable<SdserveEvent> {
    return events(
      (signal) => this.raw.generate(create(GenerateRequestSchema, request), callOptions(options, signal)),
      options.signal,
      () => checkAdapters(request.params?.adapters),
    );
  }

  /** Image-to-image; streams every event (as streamGenerate). */
  streamEdit(request: EditInput, options: CallOptions = {}): AsyncIterable<SdserveEvent> {
    return events(
      (signal) => this.raw.edit(create(EditRequestSchema, request), callOptions(options, signal)),
      options.signal,
      () => checkAdapters(request.params?.adapters),
    );
  }

  /** Inpainting; streams every event (as streamGenerate). */
  streamInpaint(request: InpaintInput, options: CallOptions = {}): AsyncIterable<SdserveEvent> {
    return events(
      (signal) => this.raw.inpaint(create(InpaintRequestSchema, request), callOptions(options, signal)),
      options.signal,
      () => checkAdapters(request.params?.adapters),
    );
  }

  /** Text-to-image; resolves with the images and their metadata. */
  generate(request: GenerateInput, options: GenerationCallOptions = {}): Promise<GenerationResult> {
    return collect(this.streamGenerate(request, options), options.onEvent);
  }

  /** Image-to-image; resolves with the images and their metadata. */
  edit(request: EditInput, options: GenerationCallOptions = {}): Promise<GenerationResult> {
    return collect(this.streamEdit(request, options), options.onEvent);
  }

  /** Inpainting; resolves with the images and their metadata. */
  inpaint(request: InpaintInput, options: GenerationCallOptions = {}): Promise<GenerationResult> {
    return collect(this.streamInpaint(request, options), options.onEvent);
  }

  /** The models this server can serve. */
  async listModels(options: CallOptions = {}): Promise<ListModelsResponse> {
    try {
      return await this.raw.listModels({}, options);
    } catch (reason) {
      throw SdserveError.from(reason);
    }
  }

  /** Device, versions, schedulers and limits. */
  async getServerInfo(options: CallOptions = {}): Promise<GetServerInfoResponse> {
    try {
      return await this.raw.getServerInfo({}, options);
    } catch (reason) {
      throw SdserveError.from(reason);
    }
  }

  /** Releases the transport's connections where this client made them (a browser's fetch holds none). */
  close(): void {}
}

function callOptions(options: CallOptions, signal: AbortSignal): ConnectCallOptions {
  return { signal, timeoutMs: options.timeoutMs, headers: options.headers };
}

/**
 * Yields a call's events and converts failures to SdserveError. Stopping early (`break`, or an
 * exception in the loop body) cancels the call, so neither the HTTP/2 stream nor the deadline timer
 * outlives the loop: Connect's own stream iterators cannot be closed early.
 */
async function* events(
  open: (signal: AbortSignal) => AsyncIterable<{ event: GenerateResponse["event"] }>,
  signal: AbortSignal | undefined,
  check: () => void,
): AsyncGenerator<SdserveEvent, void, undefined> {
  check();
  const controller = new AbortController();
  const forward = (): void => controller.abort(signal?.reason);
  if (signal?.aborted) {
    forward();
  } else {
    signal?.addEventListener("abort", forward, { once: true });
  }
  let ended = false;
  try {
    for await (const response of open(controller.signal)) {
      // An unset oneof would be an event kind newer than this client: skip it.
      if (response.event.case !== undefined) {
        yield response.event as SdserveEvent;
      }
    }
    ended = true;
  } catch (reason) {
    ended = true;
    throw SdserveError.from(reason);
  } finally {
    signal?.removeEventListener("abort", forward);
    if (!ended) {
      controller.abort(new SdserveError(Code.Canceled, "the caller stopped reading the stream"));
    }
  }
}

async function collect(
  stream: AsyncIterable<SdserveEvent>,
  onEvent: ((event: SdserveEvent) => void) | undefined,
): Promise<GenerationResult> {
  let started: StartedEvent | undefined;
  let result: GenerationResult | undefined;
  // Read to the end, not just to the result event: the call finishes (and its status is checked)
  // only when the stream ends.
  for await (const event of stream) {
    onEvent?.(event);
    if (event.case === "started") {
      started = event.value;
    } else if (event.case === "result") {
      const r = event.value;
      result = {
        images: r.images,
        parameters: r.parameters ?? create(ResolvedParametersSchema),
        timings: r.timings ?? create(TimingsSchema),
        requestId: r.requestId,
        started,
        adapters: r.parameters?.adapters ?? [],
        executionProfile: r.parameters?.executionProfile ?? "",
        replica: r.parameters?.replica ?? "",
      };
    }
  }
  if (result === undefined) {
    throw new SdserveError(Code.Internal, "the stream ended with OK but without a result event");
  }
  return result;
}
