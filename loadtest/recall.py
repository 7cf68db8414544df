"""Retrieval quality on LoCoMo, through the official SDK against a running engine.

    python loadtest/recall.py /path/to/locomo-dev.json --spawn     # make recall LOCOMO=/path/to/locomo-dev.json
    python loadtest/recall.py DATA.json --url http://127.0.0.1:3000 --key XXX1111AAA --out recall.json

Each conversation becomes one entity; each dialog turn one memory with id
`<entity>::session_<n>::<m>` (dialog id `D<n>:<m>`), text `"<speaker>: <text>"` plus the photo
caption when there is one, timestamp the session's date. Every question of categories 1-4 is asked
with `query(top_k=K)`. Reported, overall and per category:
  evidence_recall@K  mean share of a question's evidence turns in the top K
  any_hit@K          share of questions with at least one evidence turn in the top K (K=5 and K)
  session_any@K      a gold session among the first K distinct sessions of the ranking
plus query latency p50/p95 (SDK, HTTP) and ingest throughput. The data is read from the path
given; it is never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Engine, add_engine_arguments, emit, log, percentile  # noqa: E402

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
DIA_ID = re.compile(r"D(\d+):(\d+)")


def session_date_ms(text: str) -> int:
    """'1:56 pm on 8 May, 2023' -> epoch ms (UTC)."""
    for fmt in ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y"):
        try:
            return int(datetime.strptime(text.strip(), fmt).replace(tzinfo=timezone.utc).timestamp() * 1000)
        except ValueError:
            continue
    raise ValueError(f"unrecognised session date {text!r}")


def memory_id(entity: str, dia_id: str) -> str | None:
    m = DIA_ID.fullmatch(dia_id.strip())
    return f"{entity}::session_{m.group(1)}::{m.group(2)}" if m else None


def conversation_items(sample: dict, entity: str):
    from tellodb import IngestItem

    conv = sample["conversation"]
    n = 1
    while f"session_{n}" in conv:
        base = session_date_ms(conv[f"session_{n}_date_time"])
        for turn in conv[f"session_{n}"]:
            mid = memory_id(entity, turn["dia_id"])
            if mid is None:
                continue
            text = f"{turn['speaker']}: {turn['text']}"
            if turn.get("blip_caption"):
                text += f" [photo: {turn['blip_caption']}]"
            turn_no = int(mid.rsplit("::", 1)[1])
            yield IngestItem(entity_id=entity, text=text, memory_id=mid, timestamp=base + turn_no)
        n += 1


def evidence_ids(qa: dict, entity: str) -> set[str]:
    ids = set()
    for ev in qa.get("evidence", []):
        for part in re.split(r"[;,\s]+", str(ev)):
            mid = memory_id(entity, part) if part else None
            if mid:
                ids.add(mid)
    return ids


def session_of(mid: str) -> str:
    return mid.split("::")[-2]


def evaluate(client, data: list[dict], k: int, run: str) -> dict:
    per_q = []
    ingest_seconds = 0.0
    ingested = 0
    latencies = []
    for sample in data:
        entity = f"locomo:{sample.get('sample_id', 'x')}:{run}"
        items = list(conversation_items(sample, entity))
        t = time.perf_counter()
        client.ingest_many(items, batch_size=64)
        ingest_seconds += time.perf_counter() - t
        ingested += len(items)
        questions = [q for q in sample["qa"] if q.get("category") in CATEGORIES]
        log(f"{entity}: {len(items)} turns ingested, {len(questions)} questions")
        for qa in questions:
            gold = evidence_ids(qa, entity)
            if not gold:
                continue
            t = time.perf_counter()
            hits = client.query(qa["question"], entity_id=entity, top_k=k)
            latencies.append(time.perf_counter() - t)
            ranked = [h.memory_id for h in hits]
            deep = [h.memory_id for h in client.query(qa["question"], entity_id=entity, top_k=max(50, 5 * k))]
            sessions: list[str] = []
            for mid in deep:
                if session_of(mid) not in sessions:
                    sessions.append(session_of(mid))
            gold_sessions = {session_of(g) for g in gold}
            per_q.append({
                "category": qa["category"],
                "evidence_recall": len(gold & set(ranked[:k])) / len(gold),
                "any_hit@5": bool(gold & set(ranked[:5])),
                f"any_hit@{k}": bool(gold & set(ranked[:k])),
                "session_any": bool(gold_sessions & set(sessions[:k])),
            })

    def summarise(rows: list[dict]) -> dict:
        return {
            "questions": len(rows),
            f"evidence_recall@{k}": round(statistics.mean(r["evidence_recall"] for r in rows), 4),
            "any_hit@5": round(statistics.mean(r["any_hit@5"] for r in rows), 4),
            f"any_hit@{k}": round(statistics.mean(r[f"any_hit@{k}"] for r in rows), 4),
            f"session_any@{k}": round(statistics.mean(r["session_any"] for r in rows), 4),
        }

    by_cat = defaultdict(list)
    for r in per_q:
        by_cat[r["category"]].append(r)
    return {
        "k": k,
        "overall": summarise(per_q),
        "per_category": {f"{c} {CATEGORIES[c]}": summarise(rows) for c, rows in sorted(by_cat.items())},
        "query_latency_ms": {"p50": round(percentile(latencies, 50) * 1000, 2),
                             "p95": round(percentile(latencies, 95) * 1000, 2)},
        "ingest": {"memories": ingested, "per_second": round(ingested / ingest_seconds, 1)},
    }


def table(result: dict) -> str:
    k = result["k"]
    cols = [f"evidence_recall@{k}", "any_hit@5", f"any_hit@{k}", f"session_any@{k}"]
    lines = [f"| set | questions | {' | '.join(cols)} |", "|---" * (len(cols) + 2) + "|"]
    rows = [("all", result["overall"])] + list(result["per_category"].items())
    for name, r in rows:
        lines.append(f"| {name} | {r['questions']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    lat = result["query_latency_ms"]
    lines.append(f"\nquery latency p50 {lat['p50']} ms, p95 {lat['p95']} ms; "
                 f"ingest {result['ingest']['per_second']} memories/s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="LoCoMo JSON file (e.g. /path/to/locomo-dev.json; where to get it: docs/benchmarks.md)")
    add_engine_arguments(ap)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()

    from tellodb import TellodbClient

    data = json.loads(Path(args.data).read_text(encoding="utf-8"))
    with Engine(args) as engine:
        client = TellodbClient.from_cloud(base_url=engine.base, api_key=args.key)
        result = evaluate(client, data, args.k, uuid.uuid4().hex[:6])
        engine.stop()
    result["data"] = os.path.basename(args.data)
    result["backend"] = args.backend or "default"
    print(table(result), file=sys.stderr)
    emit(result, args.out)


if __name__ == "__main__":
    main()
