"""transformers 5.24 renamed a model's cache argument and output ``past_key_values`` → ``cache``
(the old name warns, and goes in 5.40); nugget2d supports transformers 5.2 onward, so it asks which
name the installed version uses."""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers.cache_utils import Cache

#: The transformers release whose models take (and return) the KV cache as ``cache``.
CACHE_RENAMED_IN = (5, 24)
#: The keyword under which a model's ``forward`` takes (and its output returns) the KV cache.
CACHE_ARGUMENT = "cache" if Version(transformers.__version__).release[:2] >= CACHE_RENAMED_IN else "past_key_values"


def returned_cache(output) -> Cache:
    """The KV cache in a model's output, whichever name this transformers gives it."""
    return output[CACHE_ARGUMENT]
