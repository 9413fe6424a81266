/** Public entry point of the sdserve TypeScript client. */
export * from "./client.js";
export { Code, SdserveError, type FieldViolation, type GrpcCodeName } from "./errors.js";
export * from "./gen/sdserve/v1/diffusion_pb.js";
