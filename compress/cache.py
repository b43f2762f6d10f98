"""The nugget cache: a ``transformers.Cache`` whose entries are nuggets and raw tokens (docs/design.md).

Per layer it holds keys and values ``(B, Hkv, N, D)`` (keys stored rotated, as transformers does),
the additive attention bias of each entry ``(B, 1, N)`` (a nugget's score, 0 for a raw token,
:data:`~nugget2d.compress.attention.MASKED` for a padding slot; ``(B, Hkv, N)`` per head), the
position each key was rotated at ``(B, N)`` (``(B, Hkv, N)`` in a per-head cache with text
positions, whose heads keep their own entries where they were), and which entries are nuggets ``(B, N)``.

A forward pass over the cache is bracketed by :meth:`NuggetCache.begin_step`, which tells the
cache the positions and padding of the tokens about to be appended, and :meth:`NuggetCache.end_step`;
transformers' attention layers call :meth:`update` as with any cache, and the registered attention
backends read the bias of every key through :meth:`attention_bias`.

Layers have types (``windows``, from the model's ``layer_types``): a sliding-window layer keeps its
window of raw entries and nothing else (:meth:`NuggetLayer.trim`); what a policy keeps, retains,
converts or spreads per head concerns the global layers (:attr:`NuggetCache.compressed_layers`) only,
and counts (:meth:`entry_counts`, the next token's cache position) are read on the first of them.
Longer than ~400 lines because it is transformers' ``Cache`` protocol, the moves a policy asks for
(retain, convert, regroup, reposition) and the file format of one class; a layer's storage is in
``cache_layer.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache

from .attention import MASKED
from .cache_layer import NuggetLayer, nugget_bias
from .rope import Rotary, layer_rotary, rerotate

_FORMAT = "nugget2d-cache"
_VERSION = "1"


class NuggetCache(Cache):
    """Nuggets and raw tokens of every layer, with the bias and position of each entry."""

    def __init__(
        self,
        num_layers: int,
        model_fingerprint: str = "",
        positions: str = "original",
        allocation: str = "token",
        windows: list[int | None] | None = None,
    ) -> None:
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} layer windows given for {num_layers} layers")
        super().__init__(layers=[NuggetLayer(window) for window in windows])
        if positions not in ("original", "cache"):
            raise ValueError(f"positions must be 'original' or 'cache', got {positions!r}")
        if allocation not in ("token", "head"):
            raise ValueError(f"allocation must be 'token' or 'head', got {allocation!r}")
        #: ``token``: every layer and head keeps the same nuggets; ``head``: each (layer, KV head) keeps its own.
        self.allocation = allocation
        self.model_fingerprint = model_fingerprint
        #: How new tokens are numbered: after the text seen (``original``) or after the entries (``cache``).
        self.position_mode = positions
        #: Text tokens consumed per row, nuggets' sources and dropped tokens included: ``(B,)`` or None.
        self.seen_tokens: torch.Tensor | None = None
        #: Called by the attention backends as ``observer(layer_idx, query, key, bias, scaling)`` on every
        #: forward pass over this cache (not copied by :meth:`fork`); None = nobody listens.
        self.observer: Callable[..., None] | None = None
        #: Per-head caches: the token-equivalent number of nuggets per row ``(B,)`` (their entries
        #: total ``span · layers · kv_heads``); nugget positions are spread over this many slots.
        self.nugget_span: torch.Tensor | None = None
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- layer types ---------------------------------------------------------------------------

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: a global layer)."""
        return [layer.window for layer in self.layers]

    @property
    def compressed_layers(self) -> list[int]:
        """Indices of the global layers: those whose entries a policy keeps, compresses and evicts."""
        return [index for index, layer in enumerate(self.layers) if not layer.sliding]

    @property
    def main_layer(self) -> NuggetLayer:
        """The layer the cache's parts are counted on: the first global one (the first layer when every
        layer slides, and then there is nothing to compress)."""
        compressed = self.compressed_layers
        return self.layers[compressed[0] if compressed else 0]

    # --- the forward-pass protocol -------------------------------------------------------------

    def begin_step(self, positions: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Announce the next appended tokens: their positions and which are real ``(B, Q)``."""
        bias = torch.where(token_mask, 0.0, MASKED).to(torch.float32)[:, None, :]
        self._step = (bias, positions)
        counted = token_mask.sum(dim=1)
        self.seen_tokens = counted if self.seen_tokens is None else self.seen_tokens + counted

    def end_step(self) -> None:
        """After a forward pass: sliding-window layers drop what no later token can see."""
        for layer in self.layers:
            layer.trim()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Append this step's keys/values at ``layer_idx``; return all keys and values of that layer —
        of a packed layer only those appended since it was packed: the nugget2d attention backends read
        its heads at their own lengths (:meth:`NuggetLayer.head_entries`), or rebuild it whole."""
        if self._step is None:
            raise RuntimeError(
                "NuggetCache.update called outside a step: run forward passes through Nugget2DModel, "
                "which calls begin_step() first"
            )
        layer = self.layers[layer_idx]
        layer.append(key_states, value_states, *self._step)
        if layer.packed:
            return layer._keys, layer._values
        return layer.keys, layer.values

    def tokens_read(self) -> int:
        """Text tokens the first row has consumed (:attr:`seen_tokens`; 0 before any)."""
        return int(self.seen_tokens[0]) if self.seen_tokens is not None else 0

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        """Entries per head at ``layer_idx`` (default: the first global layer, :attr:`main_layer`; a
        sliding-window layer holds its window only)."""
        layer = self.main_layer if layer_idx is None else self.layers[layer_idx]
        return layer.get_seq_length()

    def attention_bias(self, layer_idx: int) -> torch.Tensor:
        """Additive bias ``(B, 1, N)`` of every key at ``layer_idx``, this step's tokens included."""
        return self.layers[layer_idx].bias

    # --- choosing, converting and moving entries ----------------------------------------------

    def set_surprise(self, surprise: torch.Tensor) -> None:
        """Record the surprise ``(B, Q)`` of the last ``Q`` entries (this step's tokens: each one's negative
        log-likelihood, -inf where unknown) at every layer; entries before them that have none get -inf."""
        surprise = surprise.float()
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            shape = layer.scores.shape
            old = layer.surprise
            if old is None:
                old = torch.full(shape, float("-inf"), device=surprise.device)
            new = surprise if len(shape) == 2 else surprise[:, None, :].expand(-1, shape[1], -1)
            new = new[..., -shape[-1] :]  # a sliding-window layer may hold fewer entries than this step appended
            layer.surprise = torch.cat([old[..., : shape[-1] - new.shape[-1]], new], dim=-1)

    def set_scores(self, scores: torch.Tensor) -> None:
        """Record the scorer's scores of the last ``Q`` entries (this step's tokens): ``(B, Q)`` from a
        token scorer, ``(B, Q, layers, kv_heads)`` from a per-head one. A token-level cache keeps the
        mean of per-head scores; a per-head cache keeps ``(B, kv_heads, N)`` scores per layer."""
        scores = scores.float()
        if scores.dim() == 4 and self.allocation == "token":
            scores = scores.mean(dim=(2, 3))
        if scores.dim() == 2:
            for layer in self.layers:
                layer.scores = torch.cat([layer.scores[:, : -scores.shape[1]], scores], dim=1)
            return
        new = scores.shape[1]
        for index, layer in enumerate(self.layers):
            own = scores[:, :, index].transpose(1, 2)
            old = layer.scores[..., :-new]
            if old.dim() == 2:
                old = old[:, None, :].expand(-1, own.shape[1], -1)
            layer.scores = torch.cat([old, own], dim=2)

    def retain(self, index: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep entries ``index`` ``(B, M)`` of every row in that order; slots where ``valid`` is
        False become padding (never attended to)."""
        for layer in self._compressed():
            layer.gather(index)
            if valid is not None:
                layer.bias = layer.bias.masked_fill(~valid[:, None, :], MASKED)

    def convert(self, mask: torch.Tensor, bias_mode: str) -> None:
        """Turn the entries where ``mask`` ``(B, N)`` is True into nuggets: their attention bias
        becomes their score (``plain``) or ``s - stopgrad(s)`` (``straight_through``)."""
        for layer in self._compressed():
            bias = nugget_bias(layer.scores, bias_mode)[:, None, :]
            layer.bias = torch.where(mask[:, None, :], bias, layer.bias)
            layer.is_nugget = layer.is_nugget | mask

    def candidates(
        self, *, tail: int = 0, lead: int | None = None, pool: int | None = None
    ) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        """The entries a per-head selection chooses among — after the first ``lead`` entries, or the last
        ``pool`` before the last ``tail`` — per global layer (:attr:`compressed_layers`): their span
        ``(start, stop)`` and scores ``(B, Hkv, stop - start)`` (-inf where an entry is padding)."""
        bounds, pools = [], []
        for layer in self._compressed():
            length, heads = layer.get_seq_length(), layer.kv_heads
            start = lead if lead is not None else length - tail - pool
            bounds.append((start, length - tail))
            scores = layer.scores if layer.scores.dim() == 3 else layer.scores[:, None, :].expand(-1, heads, -1)
            valid = (layer.bias > MASKED / 2).expand(-1, heads, -1)[..., start : length - tail]
            pools.append(scores[..., start : length - tail].masked_fill(~valid, float("-inf")))
        return bounds, pools

    def regroup(
        self,
        bounds: list[tuple[int, int]],
        chosen: list[torch.Tensor],
        bias_mode: str,
        rotary_emb: Rotary | None,
    ) -> None:
        """Per global layer (as :meth:`candidates` lists them), replace entries ``bounds[i]`` by the ``chosen[i]``
        ``(B, Hkv, stop - start)`` ones, as nuggets: each head's in text order, slots a head does not use
        masked, only the pairs in use stored. With ``rotary_emb`` (cache positions; one or one per layer)
        a slot's keys are re-rotated to one position; without it (text positions) each keeps its own."""
        for index, (start, stop), picked in zip(self.compressed_layers, bounds, chosen):
            rotary = None if rotary_emb is None else layer_rotary(rotary_emb, index)
            _regroup_layer(self.layers[index], start, stop, picked, bias_mode, rotary)
            self.layers[index].pack()

    def keep_top_entries(self, *args, **kwargs) -> None:
        """Moved: the per-head rule is a policy now."""
        raise AttributeError(
            "NuggetCache.keep_top_entries moved to nugget2d.compress.policies.PerHeadBudget().keep(cache, keep, "
            "rotary_emb, ...); its tuning constants are that wrapper's fields"
        )

    def reposition(self, rotary_emb: Rotary) -> None:
        """Renumber each row's real entries 0, 1, 2, ... and re-rotate their keys to match, so the
        next token's position is the number of entries before it (docs/design.md). In a per-head cache the
        nugget slots of each layer are spread evenly over :attr:`nugget_span` positions, so every
        layer numbers the raw tokens after them alike. A sliding-window layer's entries (the last tokens)
        are numbered to end just before the next token, keeping their distances to it. ``rotary_emb``:
        one rotary for all layers, or one per layer (each layer re-rotated with its own)."""
        for index in self.compressed_layers:
            self._reposition_layer(self.layers[index], layer_rotary(rotary_emb, index))
        following = self.entry_counts() if self.batch_size else None
        for index, layer in enumerate(self.layers):
            if layer.sliding and layer.is_initialized:
                length = layer.get_seq_length()
                steps = torch.arange(length, device=layer.positions.device) - length
                target = following.to(layer.positions.device)[:, None] + steps
                delta = target - layer.positions
                if bool((delta != 0).any()):
                    layer.keys = rerotate(layer.keys, delta, layer_rotary(rotary_emb, index))
                layer.positions = target

    def _compressed(self) -> list[NuggetLayer]:
        return [self.layers[index] for index in self.compressed_layers]

    def _reposition_layer(self, layer: NuggetLayer, rotary_emb: torch.nn.Module) -> None:
        """:meth:`reposition` of one global layer."""
        if not layer.is_initialized:
            return
        valid = (layer.bias > MASKED / 2).any(dim=1)
        nuggets = layer.is_nugget & valid
        raw = valid & ~nuggets
        raw_before = raw.long().cumsum(dim=1) - raw.long()
        nuggets_before = nuggets.long().cumsum(dim=1) - nuggets.long()
        slots = nuggets.sum(dim=1, keepdim=True)
        span = slots if self.nugget_span is None else self.nugget_span[:, None].to(slots.device)
        target = raw_before + nuggets_before * span // slots.clamp(min=1)
        delta = (target[:, None, :] if layer.positions.dim() == 3 else target) - layer.positions
        if bool((delta != 0).any()):
            layer.shift_keys(delta, rotary_emb)
        layer.positions = target

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Rows in the cache (0 when empty)."""
        first = self.main_layer
        return first.bias.shape[0] if first.is_initialized else 0

    def entry_counts(self) -> torch.Tensor:
        """Real (non-padding) entries per row, ``(B,)``, counting the nuggets of a per-head cache as
        their token-equivalent :attr:`nugget_span` (so this is also the next token's cache position); counted
        on the first global layer (:attr:`main_layer`)."""
        layer = self.main_layer
        if layer.bias is None:
            return torch.zeros(0, dtype=torch.long)
        valid = (layer.bias > MASKED / 2).any(dim=1)
        return (valid & ~layer.is_nugget).sum(dim=1) + self.nugget_counts()

    def nugget_counts(self) -> torch.Tensor:
        """Nugget entries per row, ``(B,)`` (token-equivalents in a per-head cache)."""
        layer = self.main_layer
        if layer.bias is None:
            return torch.zeros(0, dtype=torch.long)
        if self.nugget_span is not None:
            return self.nugget_span.to(layer.bias.device)
        return (layer.is_nugget & (layer.bias > MASKED / 2).any(dim=1)).sum(dim=1)

    def stored_entries(self) -> torch.Tensor:
        """K/V pairs in use per row, ``(B,)``, over every layer and KV head (masked slots excluded):
        ``entry_counts() · layers · kv_heads`` whether the budget is spread per token or per head (plus
        what sliding-window layers hold beyond that, or minus what they hold less)."""
        total = torch.zeros(self.batch_size, dtype=torch.long)
        for layer in self.layers:
            if layer.is_initialized:
                total = total + (layer.bias > MASKED / 2).expand(-1, layer.kv_heads, -1).sum(dim=(1, 2)).cpu()
        return total

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: K/V (only those in use once packed), bias, positions and flags
        of every layer, each as its type stores them (a sliding-window layer: its window)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_tensors())

    def kv_nbytes(self) -> int:
        """Bytes of the stored keys and values alone."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_kv())

    # --- copies, devices, files ----------------------------------------------------------------

    def fork(self, detach: bool = False) -> NuggetCache:
        """A cache sharing these tensors; what is appended to the fork does not change this one."""
        twin = NuggetCache(len(self.layers), self.model_fingerprint, self.position_mode, self.allocation, self.windows)
        twin.layers = [layer.copy(detach) for layer in self.layers]
        twin.seen_tokens, twin.nugget_span = self.seen_tokens, self.nugget_span
        return twin

    def detach(self) -> NuggetCache:
        """A fork whose tensors carry no autograd history (for storing or serving)."""
        return self.fork(detach=True)

    def save(self, path: str | Path) -> Path:
        """Write the cache to a safetensors file (tensors plus the model fingerprint)."""
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for name, value in layer.tensors().items():
                # cloned: layers may share one bias/positions tensor, which safetensors refuses to write
                tensors[f"layers.{i}.{name}"] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for name in ("seen_tokens", "nugget_span"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).detach().cpu()
        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "model_fingerprint": self.model_fingerprint,
            "num_layers": json.dumps(len(self.layers)),
            "position_mode": self.position_mode,
            "allocation": self.allocation,
            "windows": json.dumps(self.windows),
        }
        path = Path(path)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> NuggetCache:
        """Read a cache written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no nugget cache file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a nugget2d cache file (format {metadata.get('format')!r})")
        cache = cls(
            int(metadata["num_layers"]),
            metadata.get("model_fingerprint", ""),
            metadata.get("position_mode", "original"),
            metadata.get("allocation", "token"),
            json.loads(metadata.get("windows", "null")),
        )
        tensors = load_file(str(path), device=str(device))
        cache.seen_tokens = tensors.pop("seen_tokens", None)
        cache.nugget_span = tensors.pop("nugget_span", None)
        for key, value in tensors.items():
            _, index, name = key.split(".")
            setattr(cache.layers[int(index)], name, value)
        for layer in cache.layers:
            if layer.keys is not None:
                layer.dtype, layer.device, layer.is_initialized = layer.keys.dtype, layer.keys.device, True
                if cache.allocation == "head":  # the file holds masked slots as zeros: store the entries in use
                    layer.pack()
        return cache

    def check_model(self, fingerprint: str, model_name: str = "this model") -> None:
        """Raise ``ValueError`` if the cache was built by a different model."""
        if self.model_fingerprint and self.model_fingerprint != fingerprint:
            raise ValueError(
                f"this nugget cache was built by another model (fingerprint {self.model_fingerprint[:12]}) "
                f"and cannot be read by {model_name} (fingerprint {fingerprint[:12]}); "
                "compress the text again with this model"
            )


def kept_in_text_order(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :func:`_regroup_layer` puts the ``chosen`` ``(B, H, N)`` entries: per row and head, the
    index of each chosen one in text order ``(B, H, S)`` (S: the most any head keeps; then the
    unchosen ones as padding), and which of those ``S`` slots are in use."""
    size = chosen.shape[2]
    order = torch.arange(size, device=chosen.device)
    counts = chosen.sum(dim=2)
    slots = int(counts.max())
    index = torch.where(chosen, order, size + order).argsort(dim=2)[..., :slots]
    return index, torch.arange(slots, device=chosen.device) < counts[..., None]


def _regroup_layer(
    layer: NuggetLayer,
    start: int,
    stop: int,
    chosen: torch.Tensor,
    bias_mode: str,
    rotary_emb: torch.nn.Module | None,
) -> None:
    """Replace entries ``[start, stop)`` of ``layer`` by the ``chosen`` ``(B, H, stop - start)`` ones:
    each head's in text order, slots a head does not use masked; all of them become nuggets."""
    batch, heads, _ = chosen.shape
    device = chosen.device
    picked, used = kept_in_text_order(chosen)
    slots = picked.shape[2]
    picked = picked + start
    length = layer.get_seq_length()
    front = torch.arange(start, device=device).expand(batch, heads, -1)
    back = torch.arange(stop, length, device=device).expand(batch, heads, -1)
    index = torch.cat([front, picked, back], dim=2)
    # any position works for a slot shared by several heads' tokens: each key is rotated to it (cache
    # positions), or keeps its own (text positions: rotary_emb is None)
    layer.gather_heads(index, rotary_emb)
    middle = slice(start, start + slots)
    bias = torch.where(used, nugget_bias(layer.scores[..., middle], bias_mode), MASKED)
    layer.bias = torch.cat([layer.bias[..., :start], bias, layer.bias[..., start + slots :]], dim=2)
    flags = layer.is_nugget.clone()
    flags[:, middle] = True
    layer.is_nugget = flags
