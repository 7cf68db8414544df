"""Hybrid ranking: dense cosine and FTS5 BM25 fused into one `similarity` in [0, 1].

HNSW, FTS5 over each memory's text and FTS5 over each turn's session window propose candidates;
every candidate is then scored exactly on all signals:
  dense   = max(0, cosine(query, memory))                                    in [0, 1]
  turn    = bm25(memory text) / best such bm25 among the candidates          in [0, 1]
  window  = bm25(turn window) / best such bm25 among the candidates          in [0, 1]
  lexical = (1 - window_share) * turn + window_share * window
  similarity = (dense_weight * dense + lexical_weight * lexical) / (dense_weight + lexical_weight)
The weights live in `ranking_config.json` in the data directory. There is no time-to-live: an
old memory is never hidden from results.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from node.facts import SINGLE_VALUED

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
    """Weights of the fused score; docs/guide/configuration.md#ranking-ranking_configjson has every field."""

    dense_weight: float = 0.6  # share of cosine similarity in the final score
    lexical_weight: float = 0.4  # share of normalised BM25 in the final score
    candidate_pool: int = 64  # candidates each retriever proposes (at least the query's limit)
    window_radius: int = 2  # turns on each side of a turn, same session, in its lexical window; 0: off
    window_share: float = 0.8  # share of the window BM25 in the lexical score
    stale_factor: float = 0.7  # a superseded fact's score is multiplied by this (the current one's, for past questions)
    single_valued_predicates: tuple[str, ...] = SINGLE_VALUED  # relation predicates that hold one value at a time
    half_life_days: dict[str, float] = field(default_factory=dict)  # recency decay per `kind`; none by default
    dedup_cosine: float = 0.95  # with enable_semantic_dedup, a memory this close to one of its entity's is not stored

    def __post_init__(self) -> None:
        if self.dense_weight < 0 or self.lexical_weight < 0 or self.dense_weight + self.lexical_weight <= 0:
            raise ValueError("ranking_config.json: weights must be non-negative and not both zero")
        if self.candidate_pool < 1:
            raise ValueError("ranking_config.json: candidate_pool must be at least 1")
        if not 0 <= self.window_radius <= 20:
            raise ValueError("ranking_config.json: window_radius must be between 0 and 20")
        if not 0.0 <= self.window_share <= 1.0:
            raise ValueError("ranking_config.json: window_share must be between 0 and 1")
        if not 0.0 < self.dedup_cosine <= 1.0:
            raise ValueError("ranking_config.json: dedup_cosine must be in (0, 1]")
        if not 0.0 <= self.stale_factor <= 1.0:
            raise ValueError("ranking_config.json: stale_factor must be between 0 and 1")
        object.__setattr__(self, "single_valued_predicates",
                           tuple(p.lower() for p in self.single_valued_predicates))
        if any(not isinstance(v, (int, float)) or v <= 0 for v in self.half_life_days.values()):
            raise ValueError("ranking_config.json: half_life_days values must be positive numbers of days")

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


def lexical_score(turn: Any, max_turn: float, window: Any, max_window: float, config: RankingConfig) -> Any:
    """Turn and window BM25 (positive, 0 if absent), each normalised by its best, mixed; in [0, 1].
    `turn` and `window`: one candidate's (floats) or many candidates' (arrays), as `fuse` takes them."""
    t = np.minimum(1.0, np.divide(turn, max_turn)) if max_turn > 0 else np.multiply(turn, 0.0)
    w = np.minimum(1.0, np.divide(window, max_window)) if max_window > 0 else np.multiply(window, 0.0)
    share = config.window_share if config.window_radius > 0 else 0.0
    return np.maximum(0.0, (1.0 - share) * t + share * w)


def decay(age_ms: float, kind: str | None, config: RankingConfig) -> float:
    """Recency factor in (0, 1] for a memory of `kind` that is `age_ms` old: 1 unless its kind has
    a half-life in `half_life_days` (none has by default: nothing fades unless configured)."""
    half_life = config.half_life_days.get(kind or "")
    if not half_life or age_ms <= 0:
        return 1.0
    return 0.5 ** (age_ms / (half_life * 86_400_000))


def decays(ages_ms: list[int], kinds: list[str | None], config: RankingConfig) -> Any:
    """`decay` of many candidates: 1.0 for all when no kind has a half-life (the default)."""
    if not config.half_life_days:
        return 1.0
    return np.array([decay(age, kind, config) for age, kind in zip(ages_ms, kinds)])


def fuse(dense: Any, lexical: Any, config: RankingConfig) -> Any:
    """The similarity of one candidate (floats), or of many (arrays), in [0, 1], from its cosine and
    its lexical score."""
    d = np.clip(dense, 0.0, 1.0)
    lex = np.clip(lexical, 0.0, 1.0)
    total = config.dense_weight + config.lexical_weight
    return (config.dense_weight * d + config.lexical_weight * lex) / total


def rank_key(similarity: float, created_at_ms: int, memory_id: str) -> tuple[float, int, str]:
    """The order of results: best first; ties broken by recency, then id, so results are stable."""
    return -similarity, -created_at_ms, memory_id


def best_first(hit: Mapping[str, Any]) -> tuple[float, int, str]:
    """Sort key of a hit (a memory with its `similarity`) in ranking order."""
    return rank_key(hit["similarity"], hit["created_at_ms"], hit["memory_id"])


def oldest_first(hit: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key of a hit in time order (a query without text): oldest first, then by id."""
    return hit["created_at_ms"], hit["memory_id"]


@dataclass(slots=True)
class Candidate:
    """A memory being ranked: its fused score (adjusted by fact validity) and what breaks ties."""

    score: float
    created_at_ms: int
    memory_id: str
    rowid: int

    def rank_key(self) -> tuple[float, int, str]:
        return rank_key(self.score, self.created_at_ms, self.memory_id)
