"""Writes the results as a markdown table, JSON, and a throughput plot."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.stats import Phase
from bench.targets import Check


def _ms(s: float) -> str:
    if math.isnan(s):
        return "n/a"
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _cancels(trials: list[dict[str, float]]) -> str:
    lat = sorted(t["cancel_latency"] for t in trials)
    step = sorted(t["step"] for t in trials)
    return f"median {_ms(lat[len(lat) // 2])}, max {_ms(lat[-1])} (one step: {_ms(step[len(step) // 2])})"


def model_table(r: dict[str, Any]) -> list[str]:
    """One model's table: direct, sdserve batching off, sdserve batching on, and the ratio to direct."""
    d: Phase = r["direct"]["phase"]
    off, on = r["sdserve_off"], r["sdserve_on"]
    c1o: Phase = off["c1"]
    c1b: Phase = on["c1"]
    lines = [
        f"### {r['key']}: `{r['model']}`, {r['width']}x{r['height']}, {r['steps']} steps, guidance {r['guidance']:g}",
        "",
        f"Direct: `{r['direct'].get('pipeline', 'StableDiffusionPipeline')}`.",
        "",
        _row("measure", "direct diffusers", "sdserve, batching off", "sdserve, batching on", "sdserve / direct"),
        "|---|---|---|---|---|",
    ]
    for q, a, b, c in (
        ("p50", d.latency_p50, c1o.latency_p50, c1b.latency_p50),
        ("p95", d.latency_p95, c1o.latency_p95, c1b.latency_p95),
    ):
        n = f" ({d.requests} requests each)" if q == "p50" else ""
        lines.append(_row(f"latency {q}, c=1{n}", _ms(a), _ms(b), _ms(c), f"{_ratio(b, a)} / {_ratio(c, a)}"))
    base = d.images_per_s
    ratios = f"{_ratio(c1o.images_per_s, base)}x / {_ratio(c1b.images_per_s, base)}x"
    lines.append(_row("images/s, c=1", f"{base:.3f}", f"{c1o.images_per_s:.3f}", f"{c1b.images_per_s:.3f}", ratios))
    for conc in sorted(r["plan"]["throughput_requests"]):
        p: Phase = on[f"c{conc}"]
        lines.append(
            _row(
                f"images/s, c={conc} ({p.requests} requests; mean batch {p.mean_batch:.1f})",
                f"{base:.3f} (sequential)",
                "",
                f"{p.images_per_s:.3f} (latency p50 {_ms(p.latency_p50)})",
                f"{_ratio(p.images_per_s, base)}x",
            )
        )
    lines.append(
        _row(
            "time to first progress event, p50",
            f"{_ms(d.first_progress_p50)} (first step callback)",
            _ms(c1o.first_progress_p50),
            _ms(c1b.first_progress_p50),
            "",
        )
    )
    lines.append(_row("step time, p50", _ms(d.step_p50), _ms(c1o.step_p50), _ms(c1b.step_p50), ""))
    lines.append(
        _row(
            "cancel latency (cancel to the next request's Started)",
            "",
            _cancels(off["cancels"]),
            _cancels(on["cancels"]),
            "",
        )
    )
    pv = off["previews"]
    none: Phase = pv["none"]
    for key, label in (("latent_rgb_every_1", "LATENT_RGB every step"), ("full_vae_every_5", "FULL_VAE every 5 steps")):
        p = pv[key]
        share = p.server_mean.get("preview", 0.0) / p.server_mean.get("total", float("nan"))
        cost = p.latency_p50 / none.latency_p50 - 1
        lines.append(
            _row(
                f"preview cost: {label} ({p.requests} vs {none.requests} requests, interleaved)",
                "",
                f"{cost:+.1%} latency p50 ({_ms(p.latency_p50)} vs {_ms(none.latency_p50)}); "
                f"preview rendering {share:.1%} of server time",
                "",
                "",
            )
        )
    rss = r["direct"]["peak_rss"]
    lines.append(
        _row(
            "peak RSS",
            _mib(rss),
            _mib(off["peak_rss"]),
            f"{_mib(on['peak_rss_c1'])} after c=1, {_mib(on['peak_rss'])} at the end",
            f"{_ratio(off['peak_rss'], rss)} / {_ratio(on['peak_rss'], rss)}",
        )
    )
    lines.append(
        _row(
            "cold start",
            f"{_ms(r['direct']['cold_start_s'])} (spawn to loaded and warmed)",
            f"{_ms(off['cold_start_s'])} (spawn to SERVING)",
            _ms(on["cold_start_s"]),
            "",
        )
    )
    diffs = [f"{x['image_max_diff_vs_direct']}/255" for x in (off, on)]
    lines.append(_row("same images as direct (largest channel difference)", "", *diffs, ""))
    if "exact_image_max_diff_vs_direct" in off:
        exact = f"{off['exact_image_max_diff_vs_direct']}/255"
        lines.append(_row("same images as direct, precision exact (2 requests)", "", exact, "", ""))
    means = " ".join(f"{k} {_ms(v)};" for k, v in c1o.server_mean.items())
    lines += ["", f"sdserve's own timings at c=1, batching off (means): {means}"]
    limits = on.get("batch_limits") or []
    text = ", ".join(
        f"{b['model']} {b['width']}x{b['height']}: {b['max_batch_images']} ({b['source']})" for b in limits
    )
    lines.append(f"Batch limits reported by GetServerInfo: {text or 'none reported'}.")
    chosen = ", ".join(
        f"{p['model']}: {p['profile']} ({p['source']}, chosen in {p['seconds']:.1f} s; "
        + "; ".join(f"{t['profile']} {1000 * t['seconds_per_step']:.1f} ms/step" for t in p["trials"])
        + ")"
        for p in off.get("profiles") or []
    )
    lines.append(f"Execution profile (fast requests; GetServerInfo.profiles): {chosen or 'none reported'}.")
    return lines


def markdown(meta: dict[str, Any], results: list[dict[str, Any]], checks: list[Check]) -> str:
    """The whole report: machine and command, one table per model, then the targets."""
    m = meta["machine"]
    lines = [
        "## Performance",
        "",
        f"Command: `{meta['command']}` ({meta['duration_s'] / 60:.1f} minutes).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; Python {m['python']}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}; "
        f"{m['torch_threads']} torch threads both ways; OpenMP environment {m['env'] or 'default'}; "
        f"commit {m['git_commit']}; "
        f"load average at start {m['load_average']}.",
        "",
    ]
    if meta["other_load"]:
        lines += [
            "**The machine was loaded by other work during this run; treat the figures as indicative and re-run "
            "`python -m bench` on a quiet machine.** Seen:",
            "",
            *[f"- {x}" for x in meta["other_load"]],
            "",
        ]
    else:
        lines += ["No other CPU-heavy process was seen at the start or the end of the run.", ""]
    lines += [
        "Direct: the folder's own pipeline class, `from_pretrained` in a child process (`StableDiffusionPipeline` "
        "without its safety checker; `StableDiffusionXLPipeline` with `add_watermarker=False`), called with the prompt "
        "text, requests one after another, "
        "timed from the call to the PNG bytes (`output_type='pil'`, then PNG encoding). sdserve: `python -m service` "
        "as a child process, driven by `sdserve.Client` from the benchmark process (threads, at most c requests in "
        "flight), timed from the call to the Result event (its PNG also carries the parameters). Same model, size, "
        "steps, guidance, scheduler, prompts and seeds. Every request has its own prompt, so the prompt-embedding "
        "cache only ever sees the repeated empty negative prompt.",
        "",
    ]
    for r in results:
        lines += [*model_table(r), ""]
    lines += ["### Targets", "", "| model | target | measured | limit | met |", "|---|---|---|---|---|"]
    lines += [f"| {c.model} | {c.target} | {c.value} | {c.limit} | {'yes' if c.met else '**no**'} |" for c in checks]
    lines.append("")
    return "\n".join(lines)


def _plain(v: object) -> object:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def write_json(path: Path, meta: dict[str, Any], results: list[dict[str, Any]], checks: list[Check]) -> None:
    path.write_text(json.dumps(_plain({"meta": meta, "models": results, "targets": checks}), indent=2))


def plot(path: Path, results: list[dict[str, Any]]) -> bool:
    """Images/s against concurrency, sdserve versus direct sequential, one panel per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        on = r["sdserve_on"]
        concs = [1, *sorted(r["plan"]["throughput_requests"])]
        ys = [on["c1"].images_per_s, *(on[f"c{c}"].images_per_s for c in concs[1:])]
        ax.plot(concs, ys, "o-", label="sdserve, batching on")
        ax.plot([1], [r["sdserve_off"]["c1"].images_per_s], "s", label="sdserve, batching off")
        ax.axhline(r["direct"]["phase"].images_per_s, color="grey", linestyle="--", label="direct, sequential")
        ax.set_title(f"{r['key']} ({r['width']}x{r['height']}, {r['steps']} steps)")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("images/s")
        ax.set_xticks(concs)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
