"""Cache policies: what stays of the text that leaves a session's raw window.

One file per policy, each a small dataclass (:class:`CachePolicy`): ``full``, ``streaming``, ``snapkv``,
``compressive`` and ``nugget2d``. :class:`PerHeadBudget` wraps a policy whose scores differ per layer
and KV head and spreads its budget over them. To add one, subclass :class:`CachePolicy` in a file of
your own, decorate it with :func:`register_policy`, and measure it with
``nugget2d bench quality --methods <name>`` (or ``module:Class`` without registering).
"""

from .base import CachePolicy, Leaving
from .compressive import Compressive, group_bounds, pool_groups
from .full import Full
from .nugget2d import Nugget2D
from .observers import AttentionReceived, HeadAttentionReceived, attention_from_last_queries
from .per_head import PerHeadBudget
from .registry import KVPressReference, check_policy, is_kvpress, make_policy, policy_names, register_policy
from .snapkv import SnapKV, topk_in_order
from .streaming import Streaming

__all__ = [
    "AttentionReceived",
    "CachePolicy",
    "Compressive",
    "Full",
    "HeadAttentionReceived",
    "KVPressReference",
    "Leaving",
    "Nugget2D",
    "PerHeadBudget",
    "SnapKV",
    "Streaming",
    "attention_from_last_queries",
    "check_policy",
    "group_bounds",
    "is_kvpress",
    "make_policy",
    "policy_names",
    "pool_groups",
    "register_policy",
    "topk_in_order",
]
