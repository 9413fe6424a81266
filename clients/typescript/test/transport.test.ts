/** Unit tests of SdserveClient over a caller's Transport (an in-memory Connect router): no server, no HTTP. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import { createBrowserClient, createBrowserTransport } from "../src/browser.js";
import {
  Code,
  DiffusionService,
  GenerateResponseSchema,
  SdserveClient,
  SdserveError,
  SdserveTransportClient,
  type GenerateRequest,
} from "../src/index.js";

/** A transport whose DiffusionService answers ListModels and streams one Generate, recording the request. */
function fakeServer(seen: GenerateRequest[]) {
  return createRouterTransport(({ service }) => {
    service(DiffusionService, {
      listModels: () => ({ defaultModel: "fake", models: [{ name: "fake", family: "sd15" }] }),
      async *generate(request) {
        seen.push(request);
        yield create(GenerateResponseSchema, { event: { case: "queued", value: { position: 0 } } });
        yield create(GenerateResponseSchema, { event: { case: "progress", value: { step: 1, totalSteps: 1 } } });
        const image = { index: 0, data: new Uint8Array([1, 2, 3]), seed: request.params?.seed ?? 0n };
        yield create(GenerateResponseSchema, { event: { case: "result", value: { images: [image], requestId: "r" } } });
      },
    });
  });
}

test("a client made from a Transport calls over it, with the same wrapper", async () => {
  const seen: GenerateRequest[] = [];
  const client = new SdserveClient(fakeServer(seen));
  assert.ok(client instanceof SdserveTransportClient);
  assert.equal((await client.listModels()).defaultModel, "fake");
  const kinds: string[] = [];
  const result = await client.generate({ params: { prompt: "p", seed: 9n } }, { onEvent: (e) => kinds.push(e.case) });
  assert.deepEqual(kinds, ["queued", "progress", "result"]);
  assert.deepEqual([...(result.images[0]?.data ?? [])], [1, 2, 3]);
  assert.equal(seen[0]?.params?.seed, 9n);
  client.close(); // the caller owns the transport: nothing to close, no error
});

test("options that configure a transport are refused with a Transport, naming the option", () => {
  assert.throws(
    () => new SdserveClient(fakeServer([]), { apiKey: "k" }),
    (err: unknown) => err instanceof TypeError && err.message.includes("options.apiKey"),
  );
});

test("the browser entry makes Connect or gRPC-Web transports and names a bad protocol", async () => {
  assert.ok(createBrowserClient("http://127.0.0.1:1") instanceof SdserveTransportClient);
  assert.ok(createBrowserTransport("http://127.0.0.1:1", { protocol: "grpc-web" }));
  assert.throws(
    () => createBrowserTransport("http://127.0.0.1:1", { protocol: "h3" as "connect" }),
    (err: unknown) => err instanceof TypeError && err.message.includes("options.protocol"),
  );
  // Nothing listens on port 1: the failure is an SdserveError, as from SdserveClient.
  const fetchFails = (async () => {
    throw new TypeError("fetch failed");
  }) as typeof fetch;
  const client = createBrowserClient("http://127.0.0.1:1", { fetch: fetchFails });
  await assert.rejects(client.listModels(), (err: unknown) => err instanceof SdserveError && err.code === Code.Unknown);
});
