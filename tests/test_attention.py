"""Every attention backend computes softmax(q kᵀ·scale + bias) v, like the eager reference."""

from __future__ import annotations

import math

import pytest
import torch

from nugget2d.compress import MASKED, biased_attention
from nugget2d.compress.attention import extra_column_attention, sdpa_kernel

CPU_BACKENDS = ["sdpa", "flex"]
CASES = [  # (batch, query heads, kv heads, queries, keys, head dim, per-kv-head bias)
    (2, 4, 2, 5, 9, 16, False),
    (1, 6, 2, 7, 7, 33, True),
    (2, 3, 3, 1, 12, 7, False),
    (1, 8, 1, 4, 10, 64, True),
]


def _inputs(batch, q_heads, kv_heads, q_len, k_len, dim, per_head, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=generator)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    bias = torch.randn(batch, kv_heads if per_head else 1, k_len, generator=generator)
    bias[0, :, -2] = MASKED  # a padding slot (every query still sees key 0)
    return q, k, v, bias


def _naive(q, k, v, bias, causal):
    """Loop-by-loop definition, independent of every backend."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            g = h // (q_heads // kv_heads)
            for i in range(q_len):
                logits = []
                for j in range(k_len):
                    if causal and j > k_len - q_len + i:
                        logits.append(float("-inf"))
                        continue
                    extra = bias[b, g if bias.shape[1] > 1 else 0, j]
                    logits.append(float(q[b, h, i] @ k[b, g, j]) / math.sqrt(dim) + float(extra))
                weights = torch.softmax(torch.tensor(logits), dim=0)
                out[b, h, i] = weights @ v[b, g]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_eager_matches_the_definition(case, causal):
    q, k, v, bias = _inputs(*case)
    got = biased_attention(q, k, v, bias, causal=causal, backend="eager")
    assert torch.allclose(got, _naive(q, k, v, bias, causal), atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_eager(backend, case, causal):
    q, k, v, bias = _inputs(*case)
    reference = biased_attention(q, k, v, bias, causal=causal, backend="eager")
    got = biased_attention(q, k, v, bias, causal=causal, backend=backend)
    assert (got - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_flash_extra_column_math_matches_eager(case, causal):
    """The flash_attn backend's bias-in-a-column trick, run through a bias-free SDPA kernel."""
    q, k, v, bias = _inputs(*case)
    reference = biased_attention(q, k, v, bias, causal=causal, backend="eager")
    got = extra_column_attention(q, k, v, bias, q.shape[-1] ** -0.5, causal, kernel=sdpa_kernel)
    assert (got - reference).abs().max() <= 1e-5


def test_bias_changes_the_output():
    q, k, v, bias = _inputs(*CASES[0])
    plain = biased_attention(q, k, v, None, backend="sdpa")
    assert (biased_attention(q, k, v, bias, backend="sdpa") - plain).abs().max() > 1e-2


def test_fully_masked_row_gives_no_nan():
    q, k, v, _ = _inputs(*CASES[0])
    bias = torch.full((2, 1, 9), MASKED)
    for backend in ["eager", "sdpa"]:
        assert torch.isfinite(biased_attention(q, k, v, bias, backend=backend)).all()


def test_bad_shapes_and_names_are_refused():
    q, k, v, bias = _inputs(*CASES[0])
    with pytest.raises(ValueError, match="unknown attention backend"):
        biased_attention(q, k, v, bias, backend="xformers")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        biased_attention(q[:, :3], k, v, bias)
    with pytest.raises(ValueError, match="bias must be"):
        biased_attention(q, k, v, bias[..., :-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_flash_attn_on_cpu_says_what_to_use():
    q, k, v, bias = _inputs(*CASES[0])
    with pytest.raises(RuntimeError, match="sdpa"):
        biased_attention(q, k, v, bias, backend="flash_attn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash_attn"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:])
def test_gpu_backend_matches_eager(backend, case):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    q, k, v, bias = (t.cuda() for t in _inputs(*case))
    dtype = torch.bfloat16 if backend == "flash_attn" else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    reference = biased_attention(q.float(), k.float(), v.float(), bias, causal=True, backend="eager")
    got = biased_attention(q, k, v, bias, causal=True, backend=backend).float()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (got - reference).abs().max() <= tolerance
