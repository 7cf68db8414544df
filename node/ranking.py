"""Hybrid ranking: dense cosine and FTS5 BM25 fused into one `similarity` in [0, 1].

Both retrievers propose candidates; every candidate is then scored on both signals:
  dense   = max(0, cosine(query, memory))                      in [0, 1]
  lexical = bm25 / max bm25 among this query's candidates        in [0, 1]
  similarity = dense_weight * dense + lexical_weight * lexical   (weights sum to 1)
The weights live in `ranking_config.json` in the data directory. There is no time-to-live: an
old memory is never hidden from results.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

RANKING_FILE = "ranking_config.json"

# A small, general English stopword list: words that carry no topic. Not tuned to any data set.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves s t don""".split()
)
TOKEN = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_TERMS = 32


@dataclass(frozen=True)
class RankingConfig:
    """Weights of the fused score; see the README's ranking section for every field."""

    dense_weight: float = 0.6  # share of cosine similarity in the final score
    lexical_weight: float = 0.4  # share of normalised BM25 in the final score
    candidate_pool: int = 64  # candidates each retriever proposes (at least the query's limit)

    def __post_init__(self) -> None:
        if self.dense_weight < 0 or self.lexical_weight < 0 or self.dense_weight + self.lexical_weight <= 0:
            raise ValueError("ranking_config.json: weights must be non-negative and not both zero")
        if self.candidate_pool < 1:
            raise ValueError("ranking_config.json: candidate_pool must be at least 1")

    @classmethod
    def load(cls, data_dir: str | Path) -> "RankingConfig":
        """Read `ranking_config.json` from `data_dir`; the defaults when the file is absent."""
        path = Path(data_dir) / RANKING_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)


def query_terms(text: str) -> list[str]:
    """Distinct lower-cased word tokens of a query, stopwords dropped unless nothing else is left."""
    tokens = [t.lower() for t in TOKEN.findall(text)]
    content = [t for t in tokens if t not in STOPWORDS]
    chosen = content or tokens
    seen: dict[str, None] = {}
    for t in chosen:
        seen.setdefault(t, None)
    return list(seen)[:MAX_QUERY_TERMS]


def fts_match_expression(text: str) -> str | None:
    """An FTS5 MATCH expression that ORs the query's terms, each quoted (so no operator injection)."""
    terms = query_terms(text)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def fuse(dense: float, bm25: float, max_bm25: float, config: RankingConfig) -> float:
    """The similarity of one candidate, in [0, 1]. `bm25` is positive (higher is better), 0 if absent."""
    d = min(1.0, max(0.0, dense))
    lex = bm25 / max_bm25 if max_bm25 > 0 else 0.0
    lex = min(1.0, max(0.0, lex))
    total = config.dense_weight + config.lexical_weight
    return (config.dense_weight * d + config.lexical_weight * lex) / total
