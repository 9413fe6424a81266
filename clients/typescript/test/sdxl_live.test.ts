/**
 * Live SDXL tests against a running sdserve, started by tests/clients (pytest) with tiny SDXL base and
 * refiner models.
 *
 * Environment: SDSERVE_ADDR (host:port) and SDSERVE_SDXL_CASES (a JSON file written by the harness: the
 * models' names, the reference request in proto3 JSON, and the image bytes and denoising passes the
 * Python stubs got for it).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { create, equals, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { DenoisePass, GenerateRequestSchema, RefinerMode, SdserveClient, type GenerateInput } from "../src/index.js";

interface SdxlCase {
  base: string;
  refiner: string;
  request: JsonValue;
  images: { sha256: string; data_b64: string }[];
  passes: ("base" | "refiner")[];
}

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through pytest tests/clients, which starts a server`);
  }
  return value;
}

let client: SdserveClient;
let sdxl: SdxlCase;

before(() => {
  client = new SdserveClient(required("SDSERVE_ADDR"));
  sdxl = JSON.parse(readFileSync(required("SDSERVE_SDXL_CASES"), "utf8")) as SdxlCase;
});

after(() => client.close());

/** The reference request, written the way a caller would. */
function sdxlRequest(): GenerateInput {
  return {
    params: {
      model: sdxl.base,
      prompt: "a lighthouse",
      prompt2: "oil painting",
      negativePrompt: "blurry",
      negativePrompt2: "low contrast",
      width: 64,
      height: 64,
      steps: 4,
      seed: 2024n,
      conditioning: {
        originalSize: { width: 128, height: 96 },
        cropsCoordsTopLeft: { top: 8, left: 16 },
        targetSize: { width: 64, height: 64 },
        aestheticScore: 7,
      },
      refiner: { model: sdxl.refiner, mode: RefinerMode.LATENT_HANDOFF, switchAt: 0.5 },
    },
  };
}

const PASS_NAMES: Record<number, string> = { [DenoisePass.BASE]: "base", [DenoisePass.REFINER]: "refiner" };

test("sdxl: prompt2, micro-conditioning and a refiner give the Python stubs' bytes and passes", async () => {
  const request = sdxlRequest();
  const reference = fromJson(GenerateRequestSchema, sdxl.request);
  assert.ok(equals(GenerateRequestSchema, create(GenerateRequestSchema, request), reference), "request differs");
  const passes: string[] = [];
  const result = await client.generate(request, {
    onEvent: (e) => {
      if (e.case === "progress") passes.push(PASS_NAMES[e.value.denoisePass] ?? String(e.value.denoisePass));
    },
  });
  assert.equal(result.images.length, sdxl.images.length);
  result.images.forEach((image, i) => {
    const got = Buffer.from(image.data);
    assert.equal(createHash("sha256").update(got).digest("hex"), sdxl.images[i]!.sha256, `image ${i}: sha256`);
  });
  assert.deepEqual(passes, sdxl.passes);
  assert.ok(passes.includes("base") && passes.includes("refiner"), passes.join(","));

  const started = result.started;
  assert.ok(started !== undefined);
  assert.equal(started.model, sdxl.base);
  assert.equal(started.refinerModel, sdxl.refiner);
  assert.ok(started.refinerModelRevision.length > 0 && started.refinerModelVariant.length > 0);
  assert.ok(started.memoryStrategy.length > 0);

  const p = result.parameters;
  assert.equal(p.prompt2, "oil painting");
  assert.equal(p.negativePrompt2, "low contrast");
  assert.equal(p.refiner?.model, sdxl.refiner);
  assert.equal(p.refiner?.mode, RefinerMode.LATENT_HANDOFF);
  assert.equal(p.refiner?.switchAt, 0.5);
  assert.equal(p.refinerModelRevision, started.refinerModelRevision);
  assert.equal(p.refinerModelVariant, started.refinerModelVariant);
  assert.equal(p.memoryStrategy, started.memoryStrategy);
  assert.deepEqual([p.conditioning?.originalSize?.width, p.conditioning?.originalSize?.height], [128, 96]);
  assert.deepEqual([p.conditioning?.cropsCoordsTopLeft?.top, p.conditioning?.cropsCoordsTopLeft?.left], [8, 16]);
  assert.equal(p.conditioning?.aestheticScore, 7);
});

test("sdxl: listModels reports the family and the refiner", async () => {
  const { models } = await client.listModels();
  const byName = new Map(models.map((m) => [m.name, m]));
  assert.equal(byName.get(sdxl.base)?.family, "sdxl");
  assert.equal(byName.get(sdxl.base)?.refiner, false);
  assert.equal(byName.get(sdxl.refiner)?.family, "sdxl");
  assert.equal(byName.get(sdxl.refiner)?.refiner, true);
  const others = models.filter((m) => m.name !== sdxl.base && m.name !== sdxl.refiner);
  assert.ok(others.length > 0 && others.every((m) => m.family === "sd15"), JSON.stringify(others.map((m) => m.family)));
});

test("sdxl: getServerInfo reports the memory policy", async () => {
  const info = await client.getServerInfo();
  const memory = info.memory;
  assert.ok(memory !== undefined, "no memory policy");
  for (const mode of [memory.vaeTiling, memory.vaeSlicing, memory.attentionSlicing, memory.cpuOffload]) {
    assert.ok(["auto", "on", "off"].includes(mode), `mode ${mode}`);
  }
});
