// Bundles the playground's script and styles into service/web/assets (or the folder given with --out):
// assets/playground.{js,css}. The page itself, service/web/index.html, is written by hand and not built. The output is
// committed, so a server install needs no Node; tests/test_playground_bundle.py rebuilds into a temporary folder and
// fails when the committed files differ.
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({ options: { out: { type: "string", default: join(here, "../../../service/web") } } });
const out = resolve(values.out);
mkdirSync(join(out, "assets"), { recursive: true });

await esbuild.build({
  // Paths in the output are relative to this folder, so the bundle is the same from any checkout.
  absWorkingDir: here,
  entryPoints: [
    { in: "main.ts", out: "playground" },
    { in: "playground.css", out: "playground" },
  ],
  outdir: join(out, "assets"),
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022", "chrome109", "firefox115", "safari16"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
});
console.log(`playground: wrote ${join(out, "assets")}/playground.{js,css}`);
