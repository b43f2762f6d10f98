"""Where ``recall_ppl``'s passage sits in a window, for nugget2d's sessions (:mod:`.bench_quality`)
and the kvpress presses (:mod:`.bench_peers`) alike; a leaf module, so neither imports the other."""

from __future__ import annotations

#: Tokens of the window before the recalled passage starts.
RECALL_LEAD = 16


def recall_passage(window: list[int], repeat: int) -> list[int]:
    """The ``repeat`` tokens of ``window`` scored again after the context: the passage's first ones."""
    return window[RECALL_LEAD : RECALL_LEAD + repeat]
