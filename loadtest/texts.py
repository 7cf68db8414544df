"""Load-test texts: memories and queries that look like text to BM25 and to the model.

Words are drawn Zipf-distributed from `words.txt`: the 5,000 most common whole words of the
default model's WordPiece vocabulary (all-MiniLM-L6-v2, Apache-2.0), which lists them roughly by
frequency. So term frequencies are skewed as in real text, and a query's words match a realistic
share of memories (a small fixed vocabulary would make every memory match every query).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

WORDS = Path(__file__).with_name("words.txt").read_text().split()
_CUMULATIVE = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(WORDS))))


def words(rng: random.Random, n: int) -> list[str]:
    return rng.choices(WORDS, cum_weights=_CUMULATIVE, k=n)


def sentence(rng: random.Random, i: int) -> str:
    """A memory of 12 words plus a unique code (so exact-token lookups have something to find)."""
    return f"Memory {i}: " + " ".join(words(rng, 12)) + f" code{rng.randrange(10**6)}."


def query_text(rng: random.Random) -> str:
    return " ".join(words(rng, 3))
