/** Unit tests of SdserveError.from: decoding google.rpc details without a server. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { Code, SdserveError } from "../src/index.js";

test("BadRequest field violations and RetryInfo are decoded", () => {
  const cause = new ConnectError("queue full", Code.ResourceExhausted, undefined, [
    {
      desc: BadRequestSchema,
      value: { fieldViolations: [{ field: "params.width", description: "must be a multiple of 8; got 13" }] },
    },
    { desc: RetryInfoSchema, value: { retryDelay: { seconds: 1n, nanos: 500_000_000 } } },
  ]);
  const err = SdserveError.from(cause);
  assert.equal(err.code, Code.ResourceExhausted);
  assert.equal(err.codeName, "RESOURCE_EXHAUSTED");
  assert.equal(err.rawMessage, "queue full");
  assert.equal(err.message, "RESOURCE_EXHAUSTED: queue full");
  assert.deepEqual(err.fieldViolations, [{ field: "params.width", description: "must be a multiple of 8; got 13" }]);
  assert.equal(err.violation("params.width")?.description, "must be a multiple of 8; got 13");
  assert.equal(err.retryDelayMs, 1500);
  assert.equal(err.cause, cause);
  assert.equal(SdserveError.from(err), err);
});

test("non-Connect errors become UNKNOWN, aborts CANCELLED", () => {
  assert.equal(SdserveError.from(new Error("boom")).codeName, "UNKNOWN");
  const abort = new DOMException("aborted", "AbortError");
  assert.equal(SdserveError.from(abort).codeName, "CANCELLED");
});
