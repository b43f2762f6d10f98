"""`nugget2d demo` on the embedded default model (slow: loads SmolLM2-135M)."""

from __future__ import annotations

import io

import pytest

from nugget2d.runtime.demo import run_demo


@pytest.mark.slow
def test_demo_answers_with_a_smaller_cache():
    out = io.StringIO()
    full, nuggets = run_demo(context_tokens=768, ratio=0.1, max_new_tokens=8, budget=384, out=out)
    assert full.cache_tokens > 768 and nuggets.cache_tokens <= 384
    assert nuggets.cache_bytes < 0.5 * full.cache_bytes
    assert full.answer.strip() and len(nuggets.answers) == 2 and all(a.strip() for a in nuggets.answers)
    assert "decode tok/s" in out.getvalue() and "saved" in out.getvalue()
