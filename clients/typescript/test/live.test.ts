/**
 * Live tests against a running sdserve, started by tests/clients (pytest).
 *
 * Environment: SDSERVE_ADDR (host:port) and SDSERVE_CASES (a JSON file written by the harness:
 * each case's request in proto3 JSON and the image bytes the Python stubs got for it).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import {
  Code,
  EditRequestSchema,
  GenerateRequestSchema,
  ImageFormat,
  InpaintRequestSchema,
  PreviewMode,
  SdserveClient,
  SdserveError,
  type GenerationResult,
  type SdserveEvent,
} from "../src/index.js";

interface ExpectedImage {
  sha256: string;
  data_b64: string;
}
interface Case {
  rpc: "generate" | "edit" | "inpaint";
  request: JsonValue;
  images: ExpectedImage[];
}
interface Cases {
  cases: Record<string, Case>;
}

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through pytest tests/clients, which starts a server`);
  }
  return value;
}

let client: SdserveClient;
let cases: Cases;

before(() => {
  client = new SdserveClient(required("SDSERVE_ADDR"));
  cases = JSON.parse(readFileSync(required("SDSERVE_CASES"), "utf8")) as Cases;
});

after(() => client.close());

/** A request that would run for minutes if nothing stopped it. */
const LONG = { params: { prompt: "long", width: 512, height: 512, steps: 150, seed: 3n } } as const;

async function run(c: Case): Promise<GenerationResult> {
  switch (c.rpc) {
    case "generate":
      return client.generate(fromJson(GenerateRequestSchema, c.request));
    case "edit":
      return client.edit(fromJson(EditRequestSchema, c.request));
    case "inpaint":
      return client.inpaint(fromJson(InpaintRequestSchema, c.request));
  }
}

async function rejection(promise: Promise<unknown>): Promise<SdserveError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof SdserveError, `expected an SdserveError, got ${String(err)}`);
    return err;
  }
  assert.fail("the call succeeded; expected it to fail");
}

async function assertServerFree(): Promise<void> {
  // If the stopped request still held the worker, this would wait minutes and hit its deadline.
  const result = await client.generate({ params: { prompt: "after", steps: 2, seed: 9n } }, { timeoutMs: 60_000 });
  assert.equal(result.images.length, 1);
}

test("generate, edit and inpaint return the Python stubs' exact bytes", async () => {
  const names = Object.keys(cases.cases);
  assert.deepEqual(names.sort(), ["edit", "generate", "inpaint"]);
  for (const name of names) {
    const c = cases.cases[name]!;
    const result = await run(c);
    assert.equal(result.images.length, c.images.length, `${name}: image count`);
    result.images.forEach((image, i) => {
      const want = c.images[i]!;
      const got = Buffer.from(image.data);
      assert.equal(createHash("sha256").update(got).digest("hex"), want.sha256, `${name}[${i}]: sha256`);
      assert.ok(got.equals(Buffer.from(want.data_b64, "base64")), `${name}[${i}]: bytes`);
      assert.equal(image.format, ImageFormat.PNG);
    });
    assert.ok(result.parameters.model.length > 0);
    assert.ok(result.requestId.length > 0);
    assert.ok(result.started !== undefined);
    assert.deepEqual(result.started.seeds, result.images.map((img) => img.seed));
  }
});

test("stream events arrive in order with previews", async () => {
  const seen: SdserveEvent[] = [];
  const request = {
    params: { prompt: "progress", steps: 3, seed: 5n, preview: { mode: PreviewMode.LATENT_RGB, everyNSteps: 1 } },
  };
  for await (const event of client.streamGenerate(request)) {
    seen.push(event);
  }
  assert.deepEqual(
    seen.map((e) => e.case),
    ["queued", "started", "progress", "progress", "progress", "result"],
  );
  const progress = seen.flatMap((e) => (e.case === "progress" ? [e.value] : []));
  assert.deepEqual(
    progress.map((p) => p.step),
    [1, 2, 3],
  );
  for (const p of progress) {
    assert.equal(p.totalSteps, 3);
    assert.equal(p.previews.length, 1);
    const preview = p.previews[0]!;
    assert.equal(preview.format, ImageFormat.JPEG);
    assert.deepEqual([...preview.data.subarray(0, 2)], [0xff, 0xd8], "previews are JPEG");
  }
  // The callback form sees the same order.
  const steps: number[] = [];
  await client.generate(
    { params: { prompt: "progress", steps: 2, seed: 5n } },
    { onEvent: (e) => e.case === "progress" && steps.push(e.value.step) },
  );
  assert.deepEqual(steps, [1, 2]);
});

test("aborting mid-stream ends the call with CANCELLED and frees the server", async () => {
  const controller = new AbortController();
  const progressSteps: number[] = [];
  const err = await rejection(
    (async () => {
      for await (const event of client.streamGenerate(LONG, { signal: controller.signal })) {
        if (event.case === "progress") {
          progressSteps.push(event.value.step);
          controller.abort();
        }
        assert.notEqual(event.case, "result");
      }
    })(),
  );
  assert.equal(err.code, Code.Canceled);
  assert.equal(err.codeName, "CANCELLED");
  assert.deepEqual(progressSteps, [1]);
  await assertServerFree();
});

test("leaving the loop early cancels the call and frees the server", async () => {
  for await (const event of client.streamGenerate(LONG)) {
    if (event.case === "progress") {
      break;
    }
  }
  await assertServerFree();
});

test("a deadline ends the call with DEADLINE_EXCEEDED and frees the server", async () => {
  const err = await rejection(client.generate(LONG, { timeoutMs: 500 }));
  assert.equal(err.code, Code.DeadlineExceeded);
  assert.equal(err.codeName, "DEADLINE_EXCEEDED");
  await assertServerFree();
});

test("an invalid request surfaces INVALID_ARGUMENT with field violations", async () => {
  const err = await rejection(client.generate({ params: { prompt: "bad", width: 13, seed: 1n } }));
  assert.equal(err.code, Code.InvalidArgument);
  assert.equal(err.codeName, "INVALID_ARGUMENT");
  const width = err.violation("params.width");
  assert.ok(width, `no params.width violation in ${JSON.stringify(err.fieldViolations)}`);
  assert.match(width.description, /multiple of 8/);
  assert.equal(err.retryDelayMs, undefined);
});

test("listModels and getServerInfo answer", async () => {
  const models = await client.listModels();
  assert.ok(models.defaultModel.length > 0);
  assert.ok(models.models.some((m) => m.name === models.defaultModel));
  const info = await client.getServerInfo();
  assert.equal(info.defaultModel, models.defaultModel);
  assert.equal(info.limits?.maxMessageBytes, 64n * 1024n * 1024n);
});
