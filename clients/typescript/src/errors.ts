/** SdserveError: a gRPC failure with its google.rpc details (BadRequest, RetryInfo) decoded. */
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export { Code };

/** The canonical gRPC status code names, indexed by code number (Connect's `Code` uses the same numbers). */
const CODE_NAMES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
] as const;

/** A gRPC status code name such as `"INVALID_ARGUMENT"`. */
export type GrpcCodeName = (typeof CODE_NAMES)[number];

/** One bad request field: `field` is a path such as `params.width`; `description` says which rule it broke. */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/**
 * The error every sdserve call rejects with.
 *
 * `code` is Connect's `Code` (numerically the gRPC code); `codeName` is the gRPC name
 * (`"INVALID_ARGUMENT"`, `"CANCELLED"`, ...). For INVALID_ARGUMENT, `fieldViolations` lists each bad
 * field; for RESOURCE_EXHAUSTED because the queue was full, `retryDelayMs` says how long to wait.
 */
export class SdserveError extends Error {
  override readonly name = "SdserveError";
  readonly code: Code;
  readonly codeName: GrpcCodeName;
  /** The server's status message, without the `[code]` prefix. */
  readonly rawMessage: string;
  readonly fieldViolations: readonly FieldViolation[];
  /** The server's RetryInfo delay in milliseconds, when it sent one. */
  readonly retryDelayMs: number | undefined;
  /** Response trailers (and headers) that came with the error. */
  readonly metadata: Headers;

  constructor(
    code: Code,
    rawMessage: string,
    init: {
      fieldViolations?: readonly FieldViolation[];
      retryDelayMs?: number;
      metadata?: Headers;
      cause?: unknown;
    } = {},
  ) {
    const codeName = CODE_NAMES[code] ?? "UNKNOWN";
    super(`${codeName}: ${rawMessage}`, { cause: init.cause });
    this.code = code;
    this.codeName = codeName;
    this.rawMessage = rawMessage;
    this.fieldViolations = init.fieldViolations ?? [];
    this.retryDelayMs = init.retryDelayMs;
    this.metadata = init.metadata ?? new Headers();
  }

  /** The violation for `field` (for example `params.width`), if the server named it. */
  violation(field: string): FieldViolation | undefined {
    return this.fieldViolations.find((v) => v.field === field);
  }

  /** Converts anything a Connect call throws (ConnectError, AbortError, ...) into an SdserveError. */
  static from(reason: unknown): SdserveError {
    if (reason instanceof SdserveError) {
      return reason;
    }
    const err = ConnectError.from(reason);
    const fieldViolations: FieldViolation[] = [];
    let retryDelayMs: number | undefined;
    try {
      for (const bad of err.findDetails(BadRequestSchema)) {
        for (const v of bad.fieldViolations) {
          fieldViolations.push({ field: v.field, description: v.description });
        }
      }
      for (const retry of err.findDetails(RetryInfoSchema)) {
        if (retry.retryDelay) {
          retryDelayMs = Number(retry.retryDelay.seconds) * 1000 + Math.round(retry.retryDelay.nanos / 1e6);
        }
      }
    } catch {
      // Undecodable details must not hide the status itself.
    }
    return new SdserveError(err.code, err.rawMessage, {
      fieldViolations,
      retryDelayMs,
      metadata: err.metadata,
      cause: reason,
    });
  }
}
