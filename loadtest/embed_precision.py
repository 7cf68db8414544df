"""The ONNX backends side by side: how close their vectors are to fp32's, and what a pass costs.

    python loadtest/embed_precision.py --out-dir loadtest/results --name embed-precision-2core

One process, one thread per session (a node's embedder), each backend exported into one temporary
data directory (`onnx`, `onnx-w8`, `onnx-int8`). Measured per backend, best of `--rounds` rounds:

- cosine to the fp32 vectors: 256 chat sentences and 300 three-word queries (min and mean);
- a three-word query's model pass, back to back (`hot`) and after `--gap-ms` of sleep, which is
  what a query meets in the engine: between two queries the weights leave the CPU's caches, and a
  pass that reads fewer bytes of weights suffers less (`cold`);
- a chat sentence's pass (the text the torch yardstick embeds alone);
- batches of 64 sentences, texts/s.

Retrieval quality is not measured here but through the engine (`loadtest/recall.py`). JSON and
Markdown go to `--out-dir`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

BACKENDS = ("onnx", "onnx-w8", "onnx-int8")


def pass_ms(embed, texts: list[str], gap_s: float) -> float:
    """p50 of one text's pass, `gap_s` of sleep before each."""
    took = []
    for text in texts:
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        embed([text])
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


def measure(embedder, fp32, queries: list[str], sentences: list[str], gap_s: float, rounds: int,
            seconds: float) -> dict:
    docs = (embedder.encode(sentences) * fp32.encode(sentences)).sum(axis=1)
    asked = (embedder.encode(queries) * fp32.encode(queries)).sum(axis=1)
    embedder.encode(sentences[:64])
    hot, cold, sentence, rate = [], [], [], []
    for _ in range(rounds):
        hot.append(pass_ms(embedder.encode, queries, 0.0))
        cold.append(pass_ms(embedder.encode, queries, gap_s))
        sentence.append(pass_ms(embedder.encode, sentences[:100], 0.0))
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            embedder.encode(sentences[:64])
            done += 64
        rate.append(done / (time.perf_counter() - started))
    return {"cosine_to_fp32": {"sentences_min": round(float(docs.min()), 5), "sentences_mean": round(float(docs.mean()), 5),
                               "queries_min": round(float(asked.min()), 5), "queries_mean": round(float(asked.mean()), 5)},
            "query_hot_ms": round(min(hot), 3), "query_cold_ms": round(min(cold), 3),
            "sentence_ms": round(min(sentence), 3), "batch64_per_second": round(max(rate), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=6.0, help="sleep before each cold pass")
    ap.add_argument("--seconds", type=float, default=5.0, help="of batches per round")
    ap.add_argument("--out-dir", default=str(ROOT / "loadtest" / "results"))
    ap.add_argument("--name", default="embed-precision-2core")
    args = ap.parse_args()

    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.embedder import load_embedder
    from texts import query_text, sentence

    rng = random.Random(7)
    queries = [query_text(rng) for _ in range(300)]
    sentences = [sentence(rng, i) for i in range(256)]
    report = {"command": "python " + " ".join(sys.argv), "gap_ms": args.gap_ms, "threads": 1, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="tellodb-precision-") as data_dir:
        model = resolve_model_path(DEFAULT_MODEL)
        fp32 = load_embedder(model, "onnx", "cpu", 1, data_dir)
        for backend in BACKENDS:
            embedder = fp32 if backend == "onnx" else load_embedder(model, backend, "cpu", 1, data_dir)
            report["backends"][backend] = measure(embedder, fp32, queries, sentences, args.gap_ms / 1000, args.rounds,
                                                  args.seconds)
            print(backend, json.dumps(report["backends"][backend]), file=sys.stderr)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# ONNX backends: precision and speed (one thread, best of {args.rounds})", "",
             f"`{report['command']}`", "",
             "| backend | cosine to fp32, sentences min / mean | queries min / mean | query pass, hot ms | "
             f"after {args.gap_ms:g} ms idle | sentence pass ms | batches of 64, texts/s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for backend, r in report["backends"].items():
        c = r["cosine_to_fp32"]
        lines.append(f"| {backend} | {c['sentences_min']:.4f} / {c['sentences_mean']:.4f} | "
                     f"{c['queries_min']:.4f} / {c['queries_mean']:.4f} | {r['query_hot_ms']} | {r['query_cold_ms']} | "
                     f"{r['sentence_ms']} | {r['batch64_per_second']} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.name}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
