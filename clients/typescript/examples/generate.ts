/**
 * Generates one image, writing each preview as it arrives and the result at the end.
 *
 *   npm run build && node dist/examples/generate.js --addr 127.0.0.1:50051 --prompt "a red circle" --out out/
 *
 * Ctrl-C cancels the request (the server stops within one step).
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ImageFormat, PreviewMode, SdserveClient, SdserveError } from "../src/index.js";

const EXTENSIONS: Record<number, string> = {
  [ImageFormat.PNG]: "png",
  [ImageFormat.JPEG]: "jpg",
  [ImageFormat.WEBP]: "webp",
};

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      addr: { type: "string", default: "127.0.0.1:50051" },
      prompt: { type: "string", default: "a red circle on a white background" },
      steps: { type: "string", default: "20" },
      seed: { type: "string" },
      width: { type: "string", default: "0" },
      height: { type: "string", default: "0" },
      out: { type: "string", default: "out" },
      "timeout-ms": { type: "string", default: "600000" },
    },
  });
  mkdirSync(values.out, { recursive: true });
  const client = new SdserveClient(values.addr);
  const controller = new AbortController();
  process.once("SIGINT", () => controller.abort());
  try {
    const stream = client.streamGenerate(
      {
        params: {
          prompt: values.prompt,
          steps: Number(values.steps),
          width: Number(values.width),
          height: Number(values.height),
          seed: values.seed === undefined ? undefined : BigInt(values.seed),
          preview: { mode: PreviewMode.LATENT_RGB, everyNSteps: 1 },
        },
      },
      { signal: controller.signal, timeoutMs: Number(values["timeout-ms"]) },
    );
    for await (const event of stream) {
      switch (event.case) {
        case "queued":
          console.log(`queued at position ${event.value.position}`);
          break;
        case "started":
          console.log(`started on ${event.value.model} with seeds ${event.value.seeds.join(", ")}`);
          break;
        case "progress":
          for (const preview of event.value.previews) {
            const file = join(values.out, `preview-${preview.index}-step-${event.value.step}.${EXTENSIONS[preview.format] ?? "bin"}`);
            writeFileSync(file, preview.data);
          }
          console.log(`step ${event.value.step}/${event.value.totalSteps}`);
          break;
        case "result":
          for (const image of event.value.images) {
            const file = join(values.out, `image-${image.index}-seed-${image.seed}.${EXTENSIONS[image.format] ?? "bin"}`);
            writeFileSync(file, image.data);
            console.log(`wrote ${file} (${image.width}x${image.height})`);
          }
          break;
      }
    }
    return 0;
  } catch (err) {
    if (err instanceof SdserveError) {
      console.error(`sdserve: ${err.codeName}: ${err.rawMessage}`);
      for (const v of err.fieldViolations) {
        console.error(`  ${v.field}: ${v.description}`);
      }
      if (err.retryDelayMs !== undefined) {
        console.error(`  retry after ${err.retryDelayMs} ms`);
      }
      return 1;
    }
    throw err;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
