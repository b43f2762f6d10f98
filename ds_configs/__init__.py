"""DeepSpeed JSON configs shipped with nugget2d (zero2, zero3, zero3 + CPU offload); see ``nugget2d train``."""
