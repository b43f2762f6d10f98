"""`nugget2d demo` on the embedded default model (slow: loads SmolLM2-135M)."""

from __future__ import annotations

import io

import pytest
from nugget2d.runtime.demo import run_demo


@pytest.mark.slow
def test_demo_prints_continuations_and_a_smaller_cache():
    out = io.StringIO()
    runs = run_demo(context_tokens=256, ratio=0.1, max_new_tokens=8, out=out)
    full, nuggets = runs
    assert full.cache_tokens == 255 and nuggets.cache_tokens == 26
    assert nuggets.cache_bytes < 0.12 * full.cache_bytes
    assert full.text.strip()
    assert "decode ms/tok" in out.getvalue()
