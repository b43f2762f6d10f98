"""Cache policies as objects: the registry, the one cache configuration, and a policy added in one file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass

import pytest
import torch
from tiny_models import text_file, tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.policies import (
    CachePolicy,
    KVPressReference,
    Leaving,
    Nugget2D,
    PerHeadBudget,
    make_policy,
    policy_names,
    register_policy,
)
from nugget2d.runtime import cache_config as cache_config_module
from nugget2d.runtime.cache_config import CacheConfig, add_cache_arguments, cache_config
from nugget2d.runtime.cli import main
from nugget2d.runtime.session import StreamingSession


@register_policy
@dataclass
class EveryOther(CachePolicy):
    """The example of docs/design.md: of the text leaving the raw window, keep every ``step``-th token."""

    name = "every-other"
    step: int = 2

    def choose(self, leaving: Leaving) -> list[int]:
        return leaving.indices[:: self.step][: leaving.count]


def _model(**config) -> Nugget2DModel:
    torch.manual_seed(0)
    return Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1, **config)).eval()


def _ids(count: int) -> list[int]:
    return torch.randint(3, 90, (count,), generator=torch.Generator().manual_seed(0)).tolist()


def test_a_policy_in_one_file_runs_in_a_session_and_keeps_what_it_chose():
    model = _model()
    config = CacheConfig(ratio=0.5, budget=64, recent=8, segment=8, sinks=2, policy="every-other", positions="original")
    session = StreamingSession(model, tiny_tokenizer(), config, chat=False)
    assert isinstance(session.policy, EveryOther) and session.allocation == "token"
    session.ingest_ids(_ids(40))
    kept = session.cache.layers[0].positions[0, 2 : 2 + session.nuggets].tolist()
    assert kept == list(range(2, 24, 2))  # every other token of the 22 that left the window (16 are raw)
    assert not bool(session.cache.layers[0].is_nugget.any())  # plain K/V of the unmodified model, no score bias


def test_a_registered_policy_is_measured_by_the_quality_bench(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    argv = ["bench", "quality", "--model", str(tiny_model_dir), "--adapter", "none", "--input",
            str(text_file(tmp_path)), "--out", str(out), "--contexts", "96", "--ratios", "0.25",
            "--metrics", "ppl", "--samples", "1", "--continuation", "8"]  # fmt: skip
    assert main([*argv, "--methods", "full,every-other,test_policies:EveryOther"]) == 0
    records = json.loads((out / "quality.json").read_text())["records"]
    by_method = {r["method"]: r["ppl"] for r in records}
    assert set(by_method) == {"full", "every-other", "test_policies:EveryOther"}
    assert by_method["every-other"] == by_method["test_policies:EveryOther"] > 1


def test_the_registry_names_every_policy_and_refuses_what_it_does_not_know():
    assert policy_names()[:5] == ("full", "nugget2d", "streaming", "snapkv", "compressive")
    assert make_policy("kvpress:KVzip") == KVPressReference("KVzip")
    with pytest.raises(ValueError, match="unknown cache policy 'h2o'.*full"):
        make_policy("h2o")
    with pytest.raises(ValueError, match="cannot load cache policy"):
        make_policy("no_such_module:Policy")
    with pytest.raises(ValueError, match="already registered"):
        register_policy(type("Other", (CachePolicy,), {"name": "every-other"}))
    with pytest.raises(ValueError, match="bench quality"):
        CacheConfig(policy="kvpress:KVzip")


def test_per_head_budgets_wrap_a_policy_that_scores_heads_only():
    assert PerHeadBudget().policy == Nugget2D() and PerHeadBudget().name == "nugget2d"
    with pytest.raises(ValueError, match="scores tokens"):
        PerHeadBudget(EveryOther())
    model = _model(allocation="head")
    session = StreamingSession(model, tiny_tokenizer(), CacheConfig(budget=64, recent=8, segment=8), chat=False)
    assert session.policy == PerHeadBudget(Nugget2D(), observation_window=32)


def test_every_cache_setting_is_a_flag_and_the_flags_make_the_configuration():
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser)
    flags = {action.dest for action in parser._actions}
    assert {f.name for f in dataclasses.fields(CacheConfig)} <= flags
    args = parser.parse_args(["--budget", "900", "--read-budget", "1200", "--policy", "snapkv", "--ratio", "0.2"])
    assert cache_config(args) == CacheConfig(ratio=0.2, budget=900, read_budget=1200, policy="snapkv")
    assert cache_config(parser.parse_args([])) == CacheConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--positions", "sideways"])


def test_the_adapter_supplies_the_ratio_and_a_different_one_is_noted(caplog):
    model = _model(ratio=0.25)
    model.adapter_source = "a trained adapter"
    session = StreamingSession(model, tiny_tokenizer(), CacheConfig(budget=64, recent=8, segment=8), chat=False)
    assert session.settings.ratio == 0.25
    cache_config_module._note_ratio.cache_clear()
    with caplog.at_level(logging.WARNING, logger="nugget2d"):
        for _ in range(3):  # e.g. one session per benchmark window: noted once
            asked = StreamingSession(model, tiny_tokenizer(), CacheConfig(ratio=0.1, budget=64, recent=8, segment=8))
    assert asked.settings.ratio == 0.1 and caplog.text.count("trained at ratio 0.25") == 1


def test_surprise_votes_record_each_tokens_surprise_and_keep_the_budget():
    """With ``surprise_votes`` reading records each token's negative log-likelihood (first token unknown),
    kept through per-head regrouping and saving; the cache stays inside its budget. Off (the default),
    nothing is recorded and nothing more is stored."""
    model = _model(allocation="head")
    ids = _ids(120)
    plain = StreamingSession(model, tiny_tokenizer(), CacheConfig(budget=64, recent=8, segment=16), chat=False)
    config = CacheConfig(budget=64, recent=8, segment=16, surprise_votes=True, scorer_first_share=0.5)
    voting = StreamingSession(model, tiny_tokenizer(), config, chat=False)
    assert voting.policy.surprise_votes and voting.policy.scorer_first_share == 0.5
    with torch.no_grad():
        fresh = model.encode(torch.tensor([ids[:16]]), cache=model.new_cache(positions="original"), surprise=True)
        logits = tiny_llama()(torch.tensor([ids[:16]])).logits[0, :-1].log_softmax(-1)
    expected = -logits.gather(1, torch.tensor(ids[1:16])[:, None])[:, 0]
    recorded = fresh.layers[0].surprise[0, 0]  # every head holds its token's surprise
    assert recorded[0] == float("-inf")
    torch.testing.assert_close(recorded[1:], expected, atol=1e-4, rtol=1e-4)  # adapters start as identity
    for session in (plain, voting):
        session.ingest_ids(ids)
        assert int(session.cache.entry_counts()[0]) <= 64
    assert all(layer.surprise is None for layer in plain.cache.layers)
    kept = voting.cache.layers[0].surprise
    assert kept is not None and kept.dim() == 3 and bool(torch.isfinite(kept).any())
