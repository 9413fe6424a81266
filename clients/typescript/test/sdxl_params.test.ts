/** Unit tests of SDXL request fields without a server: plain objects build the messages the server reads. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, toBinary, toJson } from "@bufbuild/protobuf";
import { GenerateRequestSchema, RefinerMode, type GenerateInput } from "../src/index.js";

const SDXL: GenerateInput = {
  params: {
    prompt: "a lighthouse",
    prompt2: "oil painting",
    negativePrompt2: "low contrast",
    conditioning: {
      originalSize: { width: 1024, height: 768 },
      cropsCoordsTopLeft: { top: 16, left: 32 },
      targetSize: { width: 512, height: 384 },
      aestheticScore: 7.5,
    },
    refiner: { model: "xl-refiner", mode: RefinerMode.LATENT_HANDOFF, switchAt: 0.75 },
  },
};

test("SDXL fields serialize under their proto names", () => {
  const json = toJson(GenerateRequestSchema, create(GenerateRequestSchema, SDXL));
  assert.deepEqual(json, {
    params: {
      prompt: "a lighthouse",
      prompt2: "oil painting",
      negativePrompt2: "low contrast",
      conditioning: {
        originalSize: { width: 1024, height: 768 },
        cropsCoordsTopLeft: { top: 16, left: 32 },
        targetSize: { width: 512, height: 384 },
        aestheticScore: 7.5,
      },
      refiner: { model: "xl-refiner", mode: "REFINER_MODE_LATENT_HANDOFF", switchAt: 0.75 },
    },
  });
});

test("unset SDXL fields stay unset; optional zeros are sent", () => {
  const plain = create(GenerateRequestSchema, { params: { prompt: "x" } });
  assert.equal(plain.params?.conditioning, undefined);
  assert.equal(plain.params?.refiner, undefined);
  assert.equal(plain.params?.prompt2, "");
  const zeros = create(GenerateRequestSchema, {
    params: { prompt: "x", conditioning: { aestheticScore: 0 }, refiner: { model: "r", strength: 0 } },
  });
  const back = fromBinary(GenerateRequestSchema, toBinary(GenerateRequestSchema, zeros));
  assert.equal(back.params?.conditioning?.aestheticScore, 0);
  assert.equal(back.params?.conditioning?.negativeAestheticScore, undefined);
  assert.equal(back.params?.refiner?.strength, 0);
  assert.equal(back.params?.refiner?.switchAt, undefined);
  assert.equal(back.params?.refiner?.mode, RefinerMode.UNSPECIFIED);
});
