"""Bad input gets a ValueError that says what to do; selection rules hold."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from nugget2d.compress import Nugget2DConfig, Nugget2DModel, nugget_count, select_threshold, select_topk


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        Nugget2DConfig(ratio=ratio)


def test_empty_text_is_refused():
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1))
    with pytest.raises(ValueError, match="non-empty"):
        model.compress(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty text"):
        model.compress(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.tensor([[1] * 5, [0] * 5]))


def test_model_without_rotary_positions_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no rotary position embedding"):
        Nugget2DModel.from_base(gpt2)


def test_scorer_layer_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="scorer_layer"):
        Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=4))


def test_unknown_config_values_are_named():
    with pytest.raises(ValueError, match="bias_mode must be one of"):
        Nugget2DConfig(bias_mode="sometimes")
    with pytest.raises(ValueError, match="unknown Nugget2D config keys"):
        Nugget2DConfig.from_dict({"ratio": 0.1, "rattio": 0.2})


@pytest.mark.parametrize(("n", "ratio", "k"), [(10, 0.1, 1), (30, 0.1, 3), (31, 0.1, 4), (1, 0.05, 1), (7, 1.0, 7)])
def test_nugget_count_is_ceil_n_r(n, ratio, k):
    assert nugget_count(n, ratio) == k


def test_topk_keeps_best_in_text_order_and_the_last_token():
    scores = torch.tensor([[5.0, 1.0, 9.0, 3.0, 0.0, -2.0], [0.0, 8.0, 7.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    indices, valid = select_topk(scores, 0.5, mask)
    assert indices[0].tolist() == [0, 2, 5]  # top-2 by score plus the forced last token
    assert indices[1][valid[1]].tolist() == [1, 3]  # row of 4 real tokens keeps 2: best + last real
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def test_threshold_keeps_scores_above_tau_and_the_last_token():
    scores = torch.tensor([[0.5, -1.0, 2.0, -3.0]])
    indices, valid = select_threshold(scores, 0.0)
    assert indices[valid].tolist() == [0, 2, 3]
