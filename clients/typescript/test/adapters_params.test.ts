/** Unit tests of request adapters without a server: the message the server reads, and the client-side checks. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, toBinary, toJson } from "@bufbuild/protobuf";
import {
  Code,
  GenerateRequestSchema,
  SdserveClient,
  SdserveError,
  checkAdapters,
  type AdapterInput,
  type GenerateInput,
} from "../src/index.js";

test("adapters serialize as AdapterRef; an absent scale stays unset (the server's 1), zero is sent", () => {
  const adapters: AdapterInput[] = [{ name: "pink", scale: 0.5 }, { name: "cyan" }, { name: "off", scale: 0 }];
  const request: GenerateInput = { params: { prompt: "x", adapters } };
  const json = toJson(GenerateRequestSchema, create(GenerateRequestSchema, request));
  assert.deepEqual(json, {
    params: { prompt: "x", adapters: [{ name: "pink", scale: 0.5 }, { name: "cyan" }, { name: "off", scale: 0 }] },
  });
  const wire = toBinary(GenerateRequestSchema, create(GenerateRequestSchema, request));
  const back = fromBinary(GenerateRequestSchema, wire);
  assert.deepEqual(
    back.params?.adapters.map((a) => [a.name, a.scale]),
    [
      ["pink", 0.5],
      ["cyan", undefined],
      ["off", 0],
    ],
  );
});

function violations(adapters: AdapterInput[]): [string, string][] {
  try {
    checkAdapters(adapters);
  } catch (err) {
    assert.ok(err instanceof SdserveError);
    assert.equal(err.code, Code.InvalidArgument);
    assert.ok(err.rawMessage.startsWith(`${err.fieldViolations[0]?.field}: `), err.rawMessage);
    return err.fieldViolations.map((v) => [v.field, v.description]);
  }
  return [];
}

test("checkAdapters names each bad field", () => {
  assert.deepEqual(violations([]), []);
  assert.deepEqual(violations([{ name: "a", scale: 4 }, { name: "b", scale: -4 }, { name: "c" }]), []);
  assert.deepEqual(violations([{ name: "" }]), [["params.adapters[0].name", "must not be empty"]]);
  assert.deepEqual(violations([{ name: "a" }, { name: "a", scale: 2 }]), [
    ["params.adapters[1].name", '"a" is already params.adapters[0] (each adapter once)'],
  ]);
  for (const scale of [4.01, -5, Number.NaN, Number.POSITIVE_INFINITY]) {
    const got = violations([{ name: "a", scale }]);
    assert.equal(got.length, 1, String(scale));
    assert.equal(got[0]?.[0], "params.adapters[0].scale");
    assert.match(got[0]?.[1] ?? "", /must be a finite number from -4 to 4/);
  }
  assert.deepEqual(
    violations([{ name: " ", scale: 9 }]).map(([field]) => field),
    ["params.adapters[0].name", "params.adapters[0].scale"],
  );
});

test("bad adapters reject generate, edit and inpaint before any call", async () => {
  // Nothing listens on port 1: a call that went out would fail with UNAVAILABLE, not INVALID_ARGUMENT.
  const client = new SdserveClient("127.0.0.1:1");
  try {
    const params = { prompt: "x", adapters: [{ name: "a" }, { name: "a" }] };
    const calls = [
      client.generate({ params }),
      client.edit({ params, image: new Uint8Array() }),
      client.inpaint({ params, image: new Uint8Array(), mask: new Uint8Array() }),
    ];
    for (const call of calls) {
      await assert.rejects(call, (err: unknown) => {
        assert.ok(err instanceof SdserveError);
        assert.equal(err.codeName, "INVALID_ARGUMENT");
        assert.ok(err.violation("params.adapters[1].name") !== undefined, err.message);
        return true;
      });
    }
  } finally {
    client.close();
  }
});
