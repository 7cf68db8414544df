"""Ranking logic: query terms, the FTS5 expression and score fusion (no benchmark scores here)."""

import json

import pytest

from node.ranking import RankingConfig, fts_match_expression, fuse, lexical_score, query_terms


def test_query_terms_drop_stopwords_and_keep_codes_and_numbers():
    assert query_terms("What is the order code ZX-99817 for Anna?") == ["order", "code", "zx", "99817", "anna"]


def test_query_terms_keep_stopwords_when_nothing_else_is_left():
    assert query_terms("Who are you?") == ["who", "are", "you"]
    assert query_terms("?!") == []


def test_fts_expression_quotes_every_term():
    assert fts_match_expression('x" OR y NEAR(') == '"x" OR "y" OR "near"'
    assert fts_match_expression("...") is None


def test_fuse_is_bounded_and_monotone():
    cfg = RankingConfig()
    assert fuse(1.0, 1.0, cfg) == pytest.approx(1.0)
    assert fuse(-0.5, 0.0, cfg) == 0.0
    assert fuse(0.5, 0.3, cfg) < fuse(0.5, 0.6, cfg)
    assert fuse(0.4, 0.5, cfg) < fuse(0.6, 0.5, cfg)
    for dense in (-1, 0, 0.3, 1, 1.2):
        for lex in (-0.1, 0, 0.5, 1, 3):
            assert 0.0 <= fuse(dense, lex, cfg) <= 1.0


def test_lexical_score_mixes_turn_and_window():
    cfg = RankingConfig(window_share=0.8)
    assert lexical_score(4.0, 4.0, 6.0, 6.0, cfg) == pytest.approx(1.0)
    assert lexical_score(0.0, 4.0, 6.0, 6.0, cfg) == pytest.approx(0.8)  # only its window matches
    assert lexical_score(4.0, 4.0, 0.0, 6.0, cfg) == pytest.approx(0.2)
    assert lexical_score(0.0, 0.0, 0.0, 0.0, cfg) == 0.0
    no_windows = RankingConfig(window_radius=0)
    assert lexical_score(2.0, 4.0, 6.0, 6.0, no_windows) == pytest.approx(0.5)


def test_weights_shift_the_balance():
    lexical_only = RankingConfig(dense_weight=0.0, lexical_weight=1.0)
    assert fuse(0.9, 0.0, lexical_only) == 0.0
    assert fuse(0.0, 1.0, lexical_only) == 1.0


def test_ranking_config_file(tmp_path):
    assert RankingConfig.load(tmp_path) == RankingConfig()
    (tmp_path / "ranking_config.json").write_text(json.dumps({"dense_weight": 0.3, "lexical_weight": 0.7}))
    assert RankingConfig.load(tmp_path).lexical_weight == 0.7
    (tmp_path / "ranking_config.json").write_text(json.dumps({"dense_wieght": 1}))
    with pytest.raises(ValueError, match="dense_wieght"):
        RankingConfig.load(tmp_path)
    (tmp_path / "ranking_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        RankingConfig.load(tmp_path)
    for bad in ({"dense_weight": -1}, {"window_radius": -1}, {"window_share": 1.5}, {"candidate_pool": 0}):
        with pytest.raises(ValueError):
            RankingConfig(**bad)
