"""Moved: cache policies are objects in :mod:`nugget2d.compress.policies` (one file per policy).

Old names fail with the new spelling: ``POLICIES`` is ``policy_names()``, ``check_policy`` and the
observers keep their names there, ``OBSERVATION_WINDOW`` is a field default of ``CacheConfig`` /
``PerHeadBudget``.
"""

from __future__ import annotations

_MOVED = {
    "POLICIES": "nugget2d.compress.policies.policy_names()",
    "OBSERVATION_WINDOW": "nugget2d.runtime.cache_config.CacheConfig().observation_window",
}


def __getattr__(name: str):
    new = _MOVED.get(name, f"nugget2d.compress.policies.{name}")
    raise AttributeError(f"nugget2d.runtime.cache_policies.{name} moved: use {new}")
