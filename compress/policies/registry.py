"""Finding a policy by name: ``--policy NAME``, ``--methods NAME``, ``kvpress:<Press>`` and ``module:Class``.

Hand-rolled (a dict and a decorator): kvpress has no registry to reuse, and entry points would make
a policy in a user's own file need a package install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import CachePolicy

_POLICIES: dict[str, type] = {}
KVPRESS_PREFIX = "kvpress:"
#: How the built-in policies are listed (the reference first, then the method, then the baselines).
_LISTED_FIRST = ("full", "nugget2d", "streaming", "snapkv", "compressive")


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Class decorator: make ``cls`` (a :class:`CachePolicy` with a ``name``) available by that name."""
    name = getattr(cls, "name", "")
    if not name or ":" in name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` without ':' to be registered")
    if name in _POLICIES and _POLICIES[name] is not cls:
        raise ValueError(f"a policy named {name!r} is already registered ({_POLICIES[name].__name__})")
    _POLICIES[name] = cls
    return cls


def policy_names() -> tuple[str, ...]:
    """The registered policies' names: the built-in ones first, then others in registration order."""
    return tuple(sorted(_POLICIES, key=lambda n: _LISTED_FIRST.index(n) if n in _LISTED_FIRST else len(_LISTED_FIRST)))


@dataclass(frozen=True)
class KVPressReference:
    """A kvpress press (``kvpress:<Press>``): compresses a whole prompt at once, the question unseen;
    run by ``nugget2d bench quality`` beside the sessions (the ``peers`` extra), not by a session."""

    press: str

    @property
    def name(self) -> str:
        return f"{KVPRESS_PREFIX}{self.press}"


def is_kvpress(spec: str) -> bool:
    """Whether ``spec`` names a kvpress press."""
    return spec.startswith(KVPRESS_PREFIX)


def check_policy(spec: str) -> str:
    """``spec`` if it names a policy (registered, ``kvpress:<Press>`` or an importable ``module:Class``);
    otherwise ``ValueError`` listing the choices."""
    policy_class(spec) if not is_kvpress(spec) else None
    if is_kvpress(spec) and not spec[len(KVPRESS_PREFIX) :]:
        raise ValueError("kvpress: needs a press name, e.g. kvpress:KVzip")
    return spec


def policy_class(spec: str) -> type:
    """The class ``spec`` names: a registered name, or ``module:Class`` (imported; it registers itself)."""
    if spec in _POLICIES:
        return _POLICIES[spec]
    if ":" in spec and not is_kvpress(spec):
        module, _, attribute = spec.partition(":")
        try:
            found = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load cache policy {spec!r}: {err}") from err
        if not isinstance(found, type) or not hasattr(found, "choose"):
            raise ValueError(f"{spec!r} is not a cache policy class (it has no `choose` method)")
        return found
    raise ValueError(
        f"unknown cache policy {spec!r}; choose one of {list(policy_names())}, kvpress:<Press>, or module:Class"
    )


def make_policy(spec: str, **settings: Any) -> CachePolicy | KVPressReference:
    """A policy object for ``spec`` with its settings (a kvpress press becomes a :class:`KVPressReference`)."""
    if is_kvpress(spec):
        check_policy(spec)
        return KVPressReference(spec[len(KVPRESS_PREFIX) :])
    return policy_class(spec)(**settings)
