"""Reports of a load-test run: JSON (everything), Markdown (the figures and their ratios to the
raw embedder limit) and two PNG plots (latency percentiles, throughput over time)."""

from __future__ import annotations

import json
from pathlib import Path


def ratios(summary: dict, limit: dict | None) -> dict:
    """Every throughput as a share of the raw embedder's batch throughput measured in the same run."""
    if not limit:
        return {}
    ceiling = limit["batch32_per_second"]
    return {op: round(s["items_per_second"] / ceiling, 3) for op, s in summary["operations"].items()}


def write(report: dict, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    plots = _plots(report, out_dir, name)
    paths[1].write_text(_markdown(report, [p.name for p in plots]))
    return paths + plots


def _markdown(report: dict, plots: list[str]) -> str:
    s, limit, r = report["summary"], report.get("embedder_limit"), report.get("ratios_to_limit", {})
    lines = [f"# Load test: {s['scenario']}", "",
             f"{s['concurrency']} clients for {s['duration_s']:.0f} s against {report['target']} "
             f"({report['machine']['cpus']} CPUs).", ""]
    if limit:
        lines += [f"Raw embedder limit in the same run ({limit['backend']}, {limit['threads']} threads): "
                  f"{limit['batch32_per_second']} texts/s in batches of 32, single text p50 "
                  f"{limit['single_p50_ms']} ms.", ""]
    lines += ["| operation | requests | errors | items/s | ratio to limit | p50 ms | p95 ms | p99 ms | max ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for op, o in s["operations"].items():
        lat = o["latency_ms"]
        lines.append(f"| {op} | {o['requests']} | {o['errors']} | {o['items_per_second']} | {r.get(op, '')} | "
                     f"{lat['p50']} | {lat['p95']} | {lat['p99']} | {lat['max']} |")
    base = report.get("baseline")
    if base:
        lines += ["", f"Side by side, same run: the baseline ({base['what']}).", "",
                  "| operation | baseline items/s | baseline p50 ms | baseline p99 ms | engine/baseline throughput "
                  "| engine/baseline p50 | engine/baseline p99 |", "|---|---|---|---|---|---|---|"]
        for op, cmp in base["engine_over_baseline"].items():
            b = base["summary"]["operations"][op]
            lines.append(f"| {op} | {b['items_per_second']} | {b['latency_ms']['p50']} | {b['latency_ms']['p99']} | "
                         f"{cmp['throughput_ratio']} | {cmp.get('p50_ratio', '')} | {cmp['p99_ratio']} |")
    mem = s.get("engine_memory")
    if mem:
        lines += ["", f"Engine resident memory after warm-up: {mem['after_warmup_min_mb']:.0f}-"
                      f"{mem['after_warmup_max_mb']:.0f} MiB ({mem['growth_after_warmup'] * 100:.1f}% growth).", "",
                  "| process | RSS MiB after warm-up | RSS growth | own (anonymous) memory growth |", "|---|---|---|---|"]
        lines += [f"| {p} | {v['min_mb']:.0f}-{v['max_mb']:.0f} | {v['growth'] * 100:.1f}% | "
                  f"{v['anon_growth'] * 100:.1f}% |" if "anon_growth" in v else
                  f"| {p} | {v['min_mb']:.0f}-{v['max_mb']:.0f} | {v['growth'] * 100:.1f}% | |"
                  for p, v in mem.get("per_process", {}).items()]
    if s["first_errors"]:
        lines += ["", "First errors: " + "; ".join(s["first_errors"][:5])]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out_dir: Path, name: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots need the `loadtest` extra; the numbers do not
        return []
    s = report["summary"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    pct = ["p50", "p90", "p95", "p99"]
    width = 0.8 / max(1, len(s["operations"]))
    for i, (op, o) in enumerate(s["operations"].items()):
        ax.bar([x + i * width for x in range(len(pct))], [o["latency_ms"][p] for p in pct], width, label=op)
    ax.set_xticks([x + width * (len(s["operations"]) - 1) / 2 for x in range(len(pct))], pct)
    paths.append(_save(fig, ax, "latency (ms)", f"{s['scenario']}: latency percentiles", out_dir / f"{name}-latency.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(s["items_per_second_timeline"])), s["items_per_second_timeline"], label="items/s")
    limit = report.get("embedder_limit")
    if limit:
        ax.axhline(limit["batch32_per_second"], color="grey", linestyle="--", label="raw embedder limit")
    ax.set_xlabel("seconds")
    paths.append(_save(fig, ax, "items per second", f"{s['scenario']}: throughput over time",
                       out_dir / f"{name}-throughput.png"))
    return paths


def _save(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
