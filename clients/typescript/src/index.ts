/** Public entry point of the sdserve TypeScript client. */
export {
  SdserveClient,
  SdserveTransportClient,
  DEFAULT_MAX_MESSAGE_BYTES,
  MAX_ADAPTER_SCALE,
  checkAdapters,
  type AdapterInput,
  type CallOptions,
  type ClientOptions,
  type EditInput,
  type GenerateInput,
  type GenerationCallOptions,
  type GenerationResult,
  type InpaintInput,
  type SdserveEvent,
} from "./client.js";
export { Code, SdserveError, type FieldViolation, type GrpcCodeName } from "./errors.js";
export * from "./gen/sdserve/v1/diffusion_pb.js";
