"""Everything that runs Nugget2D: model loading, generation, the `nugget2d` CLI."""

from .models import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "load_model"]
