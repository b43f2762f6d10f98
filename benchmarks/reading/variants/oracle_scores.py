"""`nugget2d bench ...` with the scorer replaced by the importance it was trained to predict (an oracle).

ORACLE=global: every token of a text a session reads is scored by KVzip's signal over the whole text
(the frozen model teacher-forced to repeat all of it, max-blended with the last 32 queries' attention,
``runtime/importance.py``): what a kvpress KVzip run ranks by, at no cost to the comparison.
ORACLE=segment: each segment the session reads is scored by that signal over the segment alone (the
scorer's training target, which sees no text after the segment).
Other passes (the continuation, the repeat, answers) keep the trained scorer's scores. Only the
``nugget2d`` method reads scores; use ``--methods nugget2d``.
Usage (repository root): ORACLE=global|segment python benchmarks/reading/variants/oracle_scores.py bench quality ...
"""

import os
import sys

import torch

from nugget2d.runtime import session as session_module
from nugget2d.runtime.cli import main
from nugget2d.runtime.importance import REPEAT_INSTRUCTION, kv_importance

MODE = os.environ.get("ORACLE", "global")
if MODE not in ("global", "segment"):
    raise SystemExit(f"ORACLE must be 'global' or 'segment', got {MODE!r}")


class OracleScorer(torch.nn.Module):
    """Hands out queued importance scores ``(1, n, layers, heads)`` to the passes they were computed
    for (matched by length), and the trained scorer's everywhere else."""

    def __init__(self, trained: torch.nn.Module) -> None:
        super().__init__()
        self.trained, self.heads, self.queue = trained, trained.heads, None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        n = hidden_states.shape[1]
        if self.queue is not None and self.queue.shape[1] >= n:
            scores, self.queue = self.queue[:, :n], self.queue[:, n:]
            self.queue = self.queue if self.queue.shape[1] else None
            return scores
        return self.trained(hidden_states)


def oracle_scores(session, ids: list[int]) -> torch.Tensor:
    """Log importance of ``ids`` read as one context, shaped as the per-head scorer's output."""
    model, device = session.model, session.model.device
    instruction = session.tokenizer(REPEAT_INSTRUCTION, add_special_tokens=False).input_ids
    context = torch.tensor([ids], device=device)
    repeat = torch.tensor([instruction + ids], device=device)
    found = kv_importance(model, context, torch.ones_like(context), repeat, torch.ones_like(repeat))
    return found.scores.clamp(min=1e-8).log().permute(0, 3, 1, 2)


def oracle_of(session) -> OracleScorer:
    if not isinstance(session.model.scorer, OracleScorer):
        session.model.scorer = OracleScorer(session.model.scorer)
    return session.model.scorer


INGEST, ENCODE = session_module.StreamingSession.ingest_ids, session_module.StreamingSession._encode_segment


def ingest_ids(self, ids, final: bool = False) -> None:
    """ORACLE=global: score the whole text the session is about to read, start ids included."""
    ids = [int(t) for t in ids]
    if MODE == "global" and ids and not self._started and self.settings.policy == "nugget2d":
        oracle_of(self).queue = oracle_scores(self, self._start_ids() + ids)
    INGEST(self, ids, final)


def encode_segment(self, ids: list[int]) -> None:
    """ORACLE=segment: score this segment by itself just before it is read."""
    if MODE == "segment" and self.settings.policy == "nugget2d":
        oracle_of(self).queue = oracle_scores(self, ids)
    ENCODE(self, ids)
    if self.settings.policy == "nugget2d" and oracle_of(self).queue is not None and MODE == "segment":
        raise RuntimeError("the segment's oracle scores were not consumed")


session_module.StreamingSession.ingest_ids = ingest_ids
session_module.StreamingSession._encode_segment = encode_segment
sys.exit(main(sys.argv[1:]))
