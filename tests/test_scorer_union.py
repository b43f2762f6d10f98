"""A union of scorers: it keeps what any member ranks high, and `nugget2d union` builds, saves and
refuses as a user expects."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import text_file
from transformers import AutoModelForCausalLM

from nugget2d.compress import Nugget2DConfig, Nugget2DModel, Scorer, UnionScorer
from nugget2d.runtime.cli import main
from nugget2d.runtime.train import TrainConfig, build_model


def _peaked(hidden: int, feature: int, scale: float) -> Scorer:
    """A token scorer whose score is ``scale`` × the hidden state's ``feature`` (plus a little of the rest)."""
    scorer = Scorer(hidden)
    with torch.no_grad():
        scorer.net[0].weight.copy_(torch.eye(hidden))
        scorer.net[0].bias.zero_()
        scorer.net[2].weight.fill_(0.05 * scale)
        scorer.net[2].weight[0, feature] = scale
        scorer.net[2].bias.zero_()
    return scorer


def test_the_union_keeps_the_top_of_each_member_whatever_their_scales():
    """Member A peaks at token 3, member B (100× A's scale) at token 7: the union's best two are both
    peaks, where the larger raw score alone would take B's peak and B's runner-up."""
    hidden = torch.rand(1, 20, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    hidden[0, 3, 0] = hidden[0, 7, 1] = 1.0
    hidden[0, 11, 1] = 0.6  # B's runner-up
    union = UnionScorer(8, None, 2)
    union.members[0].load_state_dict(_peaked(8, 0, 1.0).state_dict())
    union.members[1].load_state_dict(_peaked(8, 1, 100.0).state_dict())
    raw = torch.maximum(union.members[0](hidden), union.members[1](hidden))
    assert set(raw[0].topk(2).indices.tolist()) == {7, 11}
    union.calibrate(hidden)
    assert set(union(hidden)[0].topk(2).indices.tolist()) == {3, 7}
    for member, center, spread in zip(union.members, union.center, union.spread):  # calibrated: mean 0, spread 1
        standard = (member(hidden).detach() - center) / spread
        assert abs(float(standard.mean())) < 1e-5 and abs(float(standard.std()) - 1) < 1e-5


def test_a_per_head_union_scores_as_its_members_do():
    union = UnionScorer(8, (3, 2), 3)
    hidden = torch.randn(2, 5, 8)
    union.calibrate(hidden)
    scores = union(hidden)
    assert scores.shape == (2, 5, 3, 2) and scores.dtype == torch.float32
    members = [(m(hidden) - c) / s for m, c, s in zip(union.members, union.center, union.spread)]
    assert torch.equal(scores, torch.stack(members).amax(dim=0))
    with pytest.raises(ValueError, match="at least 2 members"):
        UnionScorer(8, None, 1)
    with pytest.raises(ValueError, match="scores that differ"):
        UnionScorer(8, None, 2).calibrate(torch.zeros(1, 4, 8))  # every token alike: one score for all


def _adapter(model_dir, directory, seed: int, **config) -> Nugget2DModel:
    """A per-head adapter on the tiny model with random (trained-looking) LoRA and scorer, saved."""
    model = Nugget2DModel.from_base(
        AutoModelForCausalLM.from_pretrained(model_dir),
        Nugget2DConfig(**{"ratio": 0.3, "scorer_layer": 1, "allocation": "head", **config}),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(directory)
    return model


def test_nugget2d_union_writes_an_adapter_that_loads_and_generates(tmp_path, tiny_model_dir, capsys):
    a, b, c = (_adapter(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate("abc"))
    text = text_file(tmp_path)
    out = tmp_path / "union"
    args = ["union", str(tmp_path / "a"), str(tmp_path / "b"), "--calibrate", str(text), "--output", str(out)]
    assert main([*args, "--model", str(tiny_model_dir)]) == 0, capsys.readouterr().err
    assert "a union of 2" in capsys.readouterr().out
    restored = Nugget2DModel.from_pretrained(out, base_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert restored.config.scorer_members == 2 and isinstance(restored.scorer, UnionScorer)
    for member, source in zip(restored.scorer.members, (a, b)):
        assert all(torch.equal(x, y) for x, y in zip(member.parameters(), source.scorer.parameters()))
    assert torch.all(restored.scorer.spread > 0)
    lora = load_file(str(out / "adapter_model.safetensors"))
    first = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert lora.keys() == first.keys() and all(torch.equal(lora[k], first[k]) for k in lora)
    record = json.loads((out / "scorer_union.json").read_text())
    assert record["command"].startswith("nugget2d union ") and len(record["members"]) == 2
    assert record["calibration"] == {"text": "text.txt", "tokens": 1500}

    # a union joins further as its members, one by one
    again = tmp_path / "union3"
    assert main(["union", str(out), str(tmp_path / "c"), "--calibrate", str(text), "--output", str(again),
                 "--model", str(tiny_model_dir), "--calibration-tokens", "500"]) == 0  # fmt: skip
    three = Nugget2DModel.from_pretrained(again, base_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert three.config.scorer_members == 3
    assert all(torch.equal(x, y) for x, y in zip(three.scorer.members[2].parameters(), c.scorer.parameters()))

    book = tmp_path / "book.txt"
    book.write_text("the old angler said that the river was good for fish . " * 60)
    shape = ["--budget", "96", "--recent", "32", "--segment", "16", "--quiet", "--max-new-tokens", "3"]
    generate = ["generate", "--model", str(tiny_model_dir), "--adapter", str(again), "--input", str(book)]
    assert main([*generate, "--prompt", "what fish ?", *shape]) == 0, capsys.readouterr().err


def test_nugget2d_union_refuses_what_cannot_be_joined(tmp_path, tiny_model_dir, corpus, capsys):
    _adapter(tiny_model_dir, tmp_path / "a", 0)
    _adapter(tiny_model_dir, tmp_path / "token", 1, allocation="token")
    _adapter(tiny_model_dir, tmp_path / "layer2", 2, scorer_layer=2)
    text, short = text_file(tmp_path), tmp_path / "short.txt"
    short.write_text("the river")
    model = ["--model", str(tiny_model_dir), "--output", str(tmp_path / "out")]
    cases = [
        ([str(tmp_path / "a"), "--calibrate", str(text)], "at least two adapter directories"),
        ([str(tmp_path / "a"), str(tmp_path / "token"), "--calibrate", str(text)], "allocation 'token'"),
        ([str(tmp_path / "a"), str(tmp_path / "layer2"), "--calibrate", str(text)], "scorer_layer 2"),
        ([str(tmp_path / "a"), str(tmp_path / "nowhere"), "--calibrate", str(text)], "not a Nugget2D adapter"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), "--calibrate", str(tmp_path / "none.txt")], "does not exist"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), "--calibrate", str(short)], "give one of at least 64"),
    ]
    for args, message in cases:
        assert main(["union", *args, *model]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written

    # a union is not what --objective scorer fits
    assert main(["union", str(tmp_path / "a"), str(tmp_path / "a"), "--calibrate", str(text), *model]) == 0
    config = TrainConfig(
        data=[str(corpus)], output=str(tmp_path / "run"), model=str(tiny_model_dir), objective="scorer",
        decoder_adapter=False, init_adapter=str(tmp_path / "out"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="start from one member's adapter"):
        build_model(config, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
