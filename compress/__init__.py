"""Nugget2D: the method — scorer, selection, nugget cache, biased attention, the model wrapper.

Imports torch, transformers and peft only (no Ray, DeepSpeed or web stack).
"""

from .attention import BACKENDS, MASKED, biased_attention, register_backends
from .cache import NuggetCache
from .config import Nugget2DConfig
from .model import Nugget2DModel, check_architecture, model_fingerprint
from .scorer import Scorer, UnionScorer
from .selection import nugget_count, select_threshold, select_topk

__all__ = [
    "BACKENDS",
    "MASKED",
    "Nugget2DConfig",
    "Nugget2DModel",
    "NuggetCache",
    "Scorer",
    "UnionScorer",
    "biased_attention",
    "check_architecture",
    "model_fingerprint",
    "nugget_count",
    "register_backends",
    "select_threshold",
    "select_topk",
]
