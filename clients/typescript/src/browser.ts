/** Browser entry point of the sdserve TypeScript client: the same calls over fetch (Connect or gRPC-Web). */
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { SdserveTransportClient, withApiKey } from "./core.js";

export * from "./core.js";
export { Code, SdserveError, type FieldViolation, type GrpcCodeName } from "./errors.js";
export * from "./gen/sdserve/v1/diffusion_pb.js";

/** Options of a browser client. */
export interface BrowserClientOptions {
  /** `connect` (the default) or `grpc-web`; the server's HTTP port answers both. */
  protocol?: "connect" | "grpc-web";
  /** Connect only: protobuf binary (the default, compact for image bytes) or JSON bodies. */
  useBinaryFormat?: boolean;
  /** Sent as `authorization: Bearer <apiKey>` on every call, for servers started with API keys. */
  apiKey?: string;
  /** Deadline applied to calls without their own `timeoutMs`. Default: none. */
  defaultTimeoutMs?: number;
  /** Connect interceptors (headers, logging, ...), run after the API key one. */
  interceptors?: Interceptor[];
  /** The fetch to use (default: the global one). */
  fetch?: typeof globalThis.fetch;
}

/** The fetch transport for `baseUrl` (the server's HTTP port, e.g. `http://127.0.0.1:8080` or a page's origin). */
export function createBrowserTransport(baseUrl: string, options: BrowserClientOptions = {}): Transport {
  const interceptors = withApiKey(options.apiKey, options.interceptors);
  const common = { baseUrl, interceptors, defaultTimeoutMs: options.defaultTimeoutMs, fetch: options.fetch };
  if (options.protocol === "grpc-web") {
    return createGrpcWebTransport(common);
  }
  if (options.protocol !== undefined && options.protocol !== "connect") {
    throw new TypeError(`options.protocol must be "connect" or "grpc-web", got ${JSON.stringify(options.protocol)}`);
  }
  return createConnectTransport({ ...common, useBinaryFormat: options.useBinaryFormat ?? true });
}

/**
 * A client for sdserve's HTTP port from a browser: `generate`, `edit`, `inpaint` (and their streams),
 * `listModels` and `getServerInfo`, as SdserveClient has them.
 *
 * ```ts
 * const client = createBrowserClient(location.origin, { apiKey });
 * for await (const event of client.streamGenerate({ params: { prompt: "a red circle" } }, { signal })) { ... }
 * ```
 */
export function createBrowserClient(baseUrl: string, options: BrowserClientOptions = {}): SdserveTransportClient {
  return new SdserveTransportClient(createBrowserTransport(baseUrl, options));
}
