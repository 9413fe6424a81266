/** SdserveClient: the typed DiffusionService calls over connect-node's gRPC transport (HTTP/2). */
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { DEFAULT_MAX_MESSAGE_BYTES, SdserveTransportClient, withApiKey } from "./core.js";

export * from "./core.js";

/** Options of a client. */
export interface ClientOptions {
  /** Largest message received or sent, in bytes. Default 64 MiB. */
  maxMessageBytes?: number;
  /** Deadline applied to calls without their own `timeoutMs`. Default: none. */
  defaultTimeoutMs?: number;
  /** Sent as `authorization: Bearer <apiKey>` on every call, for servers started with API keys. */
  apiKey?: string;
  /** Connect interceptors (headers, logging, ...), run after the API key one. */
  interceptors?: Interceptor[];
}

/** Accepts `host:port`, `http://host:port` (plaintext HTTP/2) or `https://host:port` (TLS). */
function toBaseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

/** The options that only apply when the client makes its own transport from an address. */
const TRANSPORT_OPTIONS = ["maxMessageBytes", "defaultTimeoutMs", "apiKey", "interceptors"] as const;

/**
 * A client for sdserve's DiffusionService over gRPC (HTTP/2).
 *
 * ```ts
 * const client = new SdserveClient("127.0.0.1:50051");
 * const { images } = await client.generate({ params: { prompt: "a red circle", seed: 1n } });
 * client.close();
 * ```
 *
 * Given a Connect `Transport` instead of an address, it calls over that transport; `options` must then be empty
 * (the transport carries its own interceptors, deadline and limits) and `close()` leaves the transport alone.
 */
export class SdserveClient extends SdserveTransportClient {
  private readonly session: Http2SessionManager | undefined;

  constructor(address: string | Transport, options: ClientOptions = {}) {
    if (typeof address !== "string") {
      const given = TRANSPORT_OPTIONS.find((name) => options[name] !== undefined);
      if (given !== undefined) {
        throw new TypeError(`options.${given} applies to an address, not a Transport: set it on the transport`);
      }
      super(address);
      this.session = undefined;
      return;
    }
    const baseUrl = toBaseUrl(address);
    const maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const session = new Http2SessionManager(baseUrl);
    const interceptors = withApiKey(options.apiKey, options.interceptors);
    super(
      createGrpcTransport({
        // gRPC always runs over HTTP/2 (connect-node v2 has no httpVersion option for it); plaintext
        // "http://" URLs use HTTP/2 with prior knowledge, as a plain gRPC server expects.
        baseUrl,
        sessionManager: session,
        readMaxBytes: maxBytes,
        writeMaxBytes: maxBytes,
        defaultTimeoutMs: options.defaultTimeoutMs,
        interceptors,
      }),
    );
    this.session = session;
  }

  /** Closes the HTTP/2 connection; calls still running fail. Idle connections do not keep Node alive. */
  override close(): void {
    this.session?.abort();
  }
}
