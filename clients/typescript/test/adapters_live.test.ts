/**
 * Live adapter tests against a running sdserve, started by tests/clients (pytest).
 *
 * Environment: SDSERVE_ADDR (host:port) and SDSERVE_ADAPTER_CASES (a JSON file written by the harness: an
 * unknown adapter's name and the field the server names for it, and, when the checkout ships the shapes LoRA,
 * the reference request with it in proto3 JSON, the image bytes and the resolved adapters the Python stubs got).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { create, equals, fromJson, type JsonValue } from "@bufbuild/protobuf";
import {
  AdapterKind,
  GenerateRequestSchema,
  ResolvedAdapterSchema,
  SdserveClient,
  SdserveError,
  type GenerateInput,
} from "../src/index.js";

interface AdapterCase {
  missing: string;
  field: string;
  lora: string;
  prompt?: string;
  request?: JsonValue;
  images?: { sha256: string; data_b64: string }[];
  adapters?: JsonValue[];
}

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through pytest tests/clients, which starts a server`);
  }
  return value;
}

let client: SdserveClient;
let cases: AdapterCase;

before(() => {
  client = new SdserveClient(required("SDSERVE_ADDR"));
  cases = JSON.parse(readFileSync(required("SDSERVE_ADAPTER_CASES"), "utf8")) as AdapterCase;
});

after(() => client.close());

test("adapters: an unknown adapter is NOT_FOUND naming its field", async () => {
  await assert.rejects(
    client.generate({ params: { prompt: "a red circle", steps: 2, adapters: [{ name: cases.missing }] } }),
    (err: unknown) => {
      assert.ok(err instanceof SdserveError);
      assert.equal(err.codeName, "NOT_FOUND", err.message);
      assert.ok(err.violation(cases.field) !== undefined || err.rawMessage.includes(cases.field), err.message);
      return true;
    },
  );
});

test("adapters: the shapes LoRA gives the Python stubs' bytes and resolved adapters", async (t) => {
  if (!cases.lora) {
    t.skip("the shapes LoRA (models/adapters) is not in this checkout");
    return;
  }
  // The reference request, written the way a caller would.
  const request: GenerateInput = {
    params: {
      model: "shapes",
      prompt: cases.prompt ?? "",
      steps: 8,
      seed: 5n,
      adapters: [{ name: cases.lora, scale: 1 }],
    },
  };
  const reference = fromJson(GenerateRequestSchema, cases.request ?? null);
  assert.ok(equals(GenerateRequestSchema, create(GenerateRequestSchema, request), reference), "request differs");
  const result = await client.generate(request);
  const images = cases.images ?? [];
  assert.equal(result.images.length, images.length);
  result.images.forEach((image, i) => {
    const got = createHash("sha256").update(Buffer.from(image.data)).digest("hex");
    assert.equal(got, images[i]!.sha256, `image ${i}: sha256`);
  });
  const want = (cases.adapters ?? []).map((a) => fromJson(ResolvedAdapterSchema, a));
  assert.equal(want.length, 1);
  const seen = {
    started: result.started?.adapters ?? [],
    result: result.adapters,
    parameters: result.parameters.adapters,
  };
  for (const [where, got] of Object.entries(seen)) {
    assert.equal(got.length, 1, where);
    const a = got[0]!;
    assert.ok(equals(ResolvedAdapterSchema, a, want[0]!), `${where}: ${JSON.stringify(a)}`);
    assert.deepEqual([a.name, a.kind, a.scale, a.token], [cases.lora, AdapterKind.LORA, 1, ""], where);
    assert.match(a.sha256, /^[0-9a-f]{64}$/, where);
  }
});
