"""The nugget cache: a ``transformers.Cache`` whose entries are nuggets and raw tokens (DESIGN §4).

Per layer it holds keys and values ``(B, Hkv, N, D)`` (keys stored rotated, as transformers does),
the additive attention bias of each entry ``(B, 1, N)`` (a nugget's score, 0 for a raw token,
:data:`~nugget2d.compress.attention.MASKED` for a padding slot; ``(B, Hkv, N)`` per head), the
position each key was rotated at ``(B, N)`` (``(B, Hkv, N)`` in a per-head cache with text
positions, whose heads keep their own entries where they were), and which entries are nuggets ``(B, N)``.

A forward pass over the cache is bracketed by :meth:`NuggetCache.begin_step`, which tells the
cache the positions and padding of the tokens about to be appended; transformers' attention
layers then call :meth:`update` as with any cache, and the registered attention backends read
the bias of every key through :meth:`attention_bias`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache, DynamicLayer

from .attention import MASKED
from .rope import rerotate

#: In a per-head cache a head may keep up to this many times its layer's opened slots (see
#: :meth:`NuggetCache.keep_top_entries`); None: no cap, a head may take its layer's whole share. The
#: attention backends read each head of a packed layer at its own length, so uneven heads cost little
#: decode time: uncapped, 2k far recall 3.11 instead of 4.78 with a cap of 1, 32k decode 142 instead
#: of 138 ms a token (``benchmarks/reading/README.md``, ``benchmarks/heads/ragged/``).
HEAD_SLOTS: float | None = None
#: In a per-head cache whose recent queries vote (``observed``), this many tokens' worth of entries
#: (times layers × KV heads) go first to the scorer's best entries over all layers and heads, the rest
#: by the slot rule (see :meth:`NuggetCache.keep_top_entries`); None or 0: none reserved. A fixed size,
#: not a share of the budget: what a far passage needs does not grow with the text. Measured (2k / 8k,
#: continuation / far recall): none 30.63 / 3.11, 27.47 / 2.17; 89 tokens 30.39 / 1.93, 27.36 / 2.33;
#: 111: 31.23 / 1.87, 27.32 / 2.29; 120: 31.60 / 1.83, 27.42 / 2.28; 133: 31.92 / 1.83, 27.83 / 2.28. A
#: share instead: a fifth of the budget recalled 2.51 at 2k, half continued 29.06 at 8k
#: (``benchmarks/reading/README.md``).
SCORER_RESERVE: int | None = 120
_FORMAT = "nugget2d-cache"
_VERSION = "1"


def nugget_bias(scores: torch.Tensor, bias_mode: str) -> torch.Tensor:
    """The attention bias of nuggets with ``scores``: ``s`` (plain) or ``s - stopgrad(s)``, which is
    0 in value yet passes the gradient to the scorer (straight-through)."""
    scores = scores.float()
    return scores if bias_mode == "plain" else scores - scores.detach()


class NuggetLayer(DynamicLayer):
    """One layer's entries: K/V plus per-entry bias, position, nugget flag and scorer score.

    ``keys`` and ``values`` read ``(B, Hkv, N, D)``. After :meth:`pack` only the K/V pairs in use are
    stored: the masked slots of a per-head layer (a head with fewer entries than its busiest one) hold
    nothing, and reading ``keys`` rebuilds them as zeros (never attended to), with the entries
    appended since after them.
    Assigning ``keys`` or ``values`` unpacks the layer. Hand-rolled because transformers' layers
    store dense K/V only."""

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        #: After :meth:`pack`: (keys in use ``(M, D)``, values in use ``(M, D)``, in use ``(B, Hkv, S)``)
        #: of the first ``S`` slots; ``_keys``/``_values`` then hold the entries appended since.
        self._packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: Per row and head, ``(keys, values, bias)`` of its packed slots in use, made on the first
        #: per-head read, with the bias of the packed slots it was made from (remade if that changes).
        self._head_slots: tuple[list, torch.Tensor] | None = None
        #: Per packing, where each packed pair in use lands when heads are read padded (see :meth:`padded_heads`).
        self._padding: dict | None = None
        super().__init__()
        self.bias: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.is_nugget: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        return self._whole(0)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._unpack()
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        return self._whole(1)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._unpack()
        self._values = value

    @property
    def packed(self) -> bool:
        """Whether only the K/V pairs in use are stored (see :meth:`pack`)."""
        return self._packed is not None

    def _whole(self, which: int) -> torch.Tensor | None:
        tail = self._keys if which == 0 else self._values
        if self._packed is None:
            return tail
        used, in_use = self._packed[which], self._packed[2]
        slots = used.new_zeros(*in_use.shape, used.shape[-1]).masked_scatter(in_use[..., None], used)
        return torch.cat([slots, tail], dim=2)

    def _unpack(self) -> None:
        if self._packed is not None:
            self._keys, self._values, self._packed = self._whole(0), self._whole(1), None
            self._head_slots = self._padding = None

    def pack(self) -> None:
        """Store only the K/V pairs in use (bias not masked); a layer without masked slots stays as it is."""
        if not self.is_initialized or self.bias is None:
            return
        in_use = (self.bias > MASKED / 2).expand(-1, self.kv_heads, -1)
        if bool(in_use.all()):
            return
        keys, values = self.keys, self.values
        self._packed = (keys[in_use], values[in_use], in_use)
        self._head_slots = self._padding = None
        self._keys, self._values = keys[:, :, :0], values[:, :, :0]

    def head_entries(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per row and KV head, ``(keys (n, D), values (n, D), bias (n,))`` of the entries that head
        reads, in order: its packed slots in use (none of the masked ones), then the entries appended
        since. Heads of a packed layer differ in ``n``; reading them so skips what :attr:`keys` rebuilds."""
        batch, heads = self.bias.shape[0], self.kv_heads
        bias = self.bias.expand(batch, heads, -1)
        slots = self._packed[2].shape[-1] if self._packed is not None else 0
        packed = self._packed_heads(bias[..., :slots]) if self._packed is not None else None
        entries = []
        for row in range(batch):
            entries.append([])
            for head in range(heads):
                entry = (self._keys[row, head], self._values[row, head], bias[row, head, slots:])  # appended since
                if packed is not None:
                    entry = tuple(torch.cat(pair) for pair in zip(packed[row * heads + head], entry))
                entries[-1].append(entry)
        return entries

    def _packed_heads(self, slot_bias: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per row and head, the packed slots in use: views of the packed K/V and their bias, split
        once per packing (and again if the slots' bias changed since)."""
        if self._head_slots is None or not torch.equal(self._head_slots[1], slot_bias):
            used_keys, used_values, in_use = self._packed
            counts = in_use.sum(dim=2).flatten().tolist()
            split = zip(used_keys.split(counts), used_values.split(counts), slot_bias[in_use].split(counts))
            self._head_slots = (list(split), slot_bias)
        return self._head_slots[0]

    def head_lengths(self) -> list[int]:
        """Packed slots in use per KV head (the most over the rows; zeros when the layer is not packed):
        each head reads these plus the entries appended since. Worked out once per packing."""
        if self._packed is None:
            return [0] * self.kv_heads
        plan = self._padding_plan()
        if "longest" not in plan:
            plan["longest"] = plan["lengths"].amax(dim=0).tolist()
        return plan["longest"]

    def padded_heads(self, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KV heads ``heads`` of a packed layer as one dense block: keys and values ``(B, h, L + T, D)`` and
        bias ``(B, h, L + T)``, each head's packed slots in use first, padded with masked zero slots to the
        longest of them (``L``), then the ``T`` entries appended since (so the queries are the last keys of
        every head). One copy per tensor; where each pair lands is worked out once per packing."""
        used_keys, used_values, in_use = self._packed
        plan = self._padding_plan()
        group = plan["groups"].get(heads)
        if group is None:
            group = plan["groups"][heads] = self._group_plan(plan, heads)
        source, base, rank, length = group
        batch, tail = self.bias.shape[0], self._keys.shape[2]
        bias = self.bias.expand(batch, self.kv_heads, -1)
        slot_bias = bias[..., : in_use.shape[-1]][in_use]
        index = base * (length + tail) + rank
        picked = list(heads) if len(heads) < self.kv_heads else slice(None)
        out = []
        for used, rest in ((used_keys, self._keys), (used_values, self._values)):
            block = used.new_zeros(batch * len(heads) * (length + tail), used.shape[-1])
            block.index_copy_(0, index, used if source is None else used.index_select(0, source))
            block = block.view(batch, len(heads), length + tail, -1)
            block[:, :, length:] = rest[:, picked]
            out.append(block)
        block_bias = slot_bias.new_full((batch * len(heads) * (length + tail),), MASKED)
        block_bias.index_copy_(0, index, slot_bias if source is None else slot_bias.index_select(0, source))
        block_bias = block_bias.view(batch, len(heads), length + tail)
        block_bias[:, :, length:] = bias[:, picked, in_use.shape[-1] :]
        return out[0], out[1], block_bias

    def _padding_plan(self) -> dict:
        """Per packing: each packed pair's row, head and rank within its head, and the heads' lengths."""
        if self._padding is None:
            in_use = self._packed[2]
            rows, heads, _ = in_use.nonzero(as_tuple=True)
            ranks = in_use.long().cumsum(dim=-1)[in_use] - 1
            self._padding = {"rows": rows, "heads": heads, "ranks": ranks, "lengths": in_use.sum(dim=-1), "groups": {}}
        return self._padding

    def _group_plan(self, plan: dict, heads: tuple[int, ...]) -> tuple:
        """``(source rows or None, block row of each, rank in it, padded length)`` of the pairs of ``heads``."""
        local = torch.full((self.kv_heads,), -1, dtype=torch.long, device=plan["heads"].device)
        local[list(heads)] = torch.arange(len(heads), device=local.device)
        source = None
        rows, head_of, ranks = plan["rows"], local[plan["heads"]], plan["ranks"]
        if len(heads) < self.kv_heads:
            source = (head_of >= 0).nonzero(as_tuple=True)[0]
            rows, head_of, ranks = rows[source], head_of[source], ranks[source]
        length = int(plan["lengths"][:, list(heads)].max()) if len(heads) else 0
        return source, rows * len(heads) + head_of, ranks, length

    def get_seq_length(self) -> int:
        """Entries per head (slots, masked ones included), without rebuilding packed K/V."""
        if not self.is_initialized or self._keys is None:
            return 0
        return self._keys.shape[-2] + (self._packed[2].shape[-1] if self._packed is not None else 0)

    def append(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor) -> None:
        """Append raw entries (not nuggets) at the end."""
        flags = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        scores = torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)
        if self.is_initialized and self.bias.shape[1] > 1:  # per-head entries: raw tokens are in every head
            bias = bias.expand(-1, self.bias.shape[1], -1)
        if self.is_initialized and self.scores.dim() == 3:
            scores = scores[:, None, :].expand(-1, self.scores.shape[1], -1)
        if self.is_initialized and self.positions.dim() == 3:
            positions = positions[:, None, :].expand(-1, self.positions.shape[1], -1)
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
            self.bias, self.positions, self.is_nugget, self.scores = bias, positions, flags, scores
            return
        self._keys = torch.cat([self._keys, keys], dim=-2)  # packed entries stay packed
        self._values = torch.cat([self._values, values], dim=-2)
        self.bias = torch.cat([self.bias, bias], dim=-1)
        self.positions = torch.cat([self.positions, positions], dim=-1)
        self.is_nugget = torch.cat([self.is_nugget, flags], dim=-1)
        self.scores = torch.cat([self.scores, scores], dim=-1)

    def gather(self, index: torch.Tensor) -> None:
        """Keep entries ``index`` ``(B, M)`` of each row, in that order."""
        kv_index = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, kv_index)
        self.values = self.values.gather(2, kv_index)
        self.bias = self.bias.gather(2, index[:, None, :].expand(-1, self.bias.shape[1], -1))
        per_head = index[:, None, :].expand(-1, self.positions.shape[1], -1) if self.positions.dim() == 3 else None
        self.positions = self.positions.gather(1, index) if per_head is None else self.positions.gather(2, per_head)
        self.is_nugget = self.is_nugget.gather(1, index)
        if self.scores.dim() == 3:
            self.scores = self.scores.gather(2, index[:, None, :].expand(-1, self.scores.shape[1], -1))
        else:
            self.scores = self.scores.gather(1, index)

    def gather_heads(self, index: torch.Tensor, rotary_emb: torch.nn.Module | None) -> None:
        """Keep entry ``index[b, h, j]`` in slot ``j`` of head ``h`` (``index`` ``(B, H, M)``): each head
        keeps its own entries. With ``rotary_emb`` (cache positions) a slot's keys are re-rotated to the
        first head's position; without it (text positions) every key keeps its own, and ``positions``
        becomes ``(B, H, M)``. The caller sets the bias of the slots (which heads use them)."""
        heads = self.keys.shape[1]
        kv_index = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        positions = self.positions if self.positions.dim() == 3 else self.positions[:, None, :].expand(-1, heads, -1)
        source = positions.gather(2, index)
        keys = self.keys.gather(2, kv_index)
        if rotary_emb is None:
            self.keys, self.positions = keys, source
        else:
            self.keys = rerotate(keys, source[:, :1] - source, rotary_emb)
            self.positions = source[:, 0]
        self.values = self.values.gather(2, kv_index)
        self.bias = self.bias.expand(-1, heads, -1).gather(2, index)
        scores = self.scores if self.scores.dim() == 3 else self.scores[:, None, :].expand(-1, heads, -1)
        self.scores = scores.gather(2, index)
        self.is_nugget = self.is_nugget.gather(1, index[:, 0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name as it reads, K/V whole (empty before the first append)."""
        if not self.is_initialized:
            return {}
        return {
            "keys": self.keys,
            "values": self.values,
            "bias": self.bias,
            "positions": self.positions,
            "is_nugget": self.is_nugget,
            "scores": self.scores,
        }

    @property
    def kv_heads(self) -> int:
        """KV heads of this layer (0 before the first append)."""
        return self._keys.shape[1] if self.is_initialized else 0

    def stored_kv(self) -> list[torch.Tensor]:
        """The K/V tensors held in memory (the packed pairs in use, and those appended since)."""
        if not self.is_initialized:
            return []
        return [self._keys, self._values, *(self._packed[:2] if self._packed is not None else ())]

    def stored_tensors(self) -> list[torch.Tensor]:
        """What the layer holds in memory: its K/V (packed ones with their in-use mask) and the
        per-entry bias, positions, flags and scores."""
        if not self.is_initialized:
            return []
        mask = [self._packed[2]] if self._packed is not None else []
        return [*self.stored_kv(), *mask, self.bias, self.positions, self.is_nugget, self.scores]

    def copy(self, detach: bool = False) -> NuggetLayer:
        """A new layer sharing these tensors, packed as they are (appending to it leaves this one as
        it is); ``detach`` drops their autograd history."""

        def share(value):
            return value.detach() if detach and value is not None else value

        twin = NuggetLayer()
        twin._keys, twin._values = share(self._keys), share(self._values)
        twin._packed = tuple(share(t) for t in self._packed) if self._packed is not None else None
        if self._head_slots is not None:
            twin._head_slots = ([tuple(share(t) for t in e) for e in self._head_slots[0]], share(self._head_slots[1]))
        twin._padding = self._padding  # integer plans of the same packing: shared, never changed in place
        for name in ("bias", "positions", "is_nugget", "scores"):
            setattr(twin, name, share(getattr(self, name)))
        if self.is_initialized:
            twin.dtype, twin.device, twin.is_initialized = self._keys.dtype, self.device, True
        return twin


class NuggetCache(Cache):
    """Nuggets and raw tokens of every layer, with the bias and position of each entry."""

    def __init__(
        self, num_layers: int, model_fingerprint: str = "", positions: str = "original", allocation: str = "token"
    ) -> None:
        super().__init__(layers=[NuggetLayer() for _ in range(num_layers)])
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

    # --- the forward-pass protocol -------------------------------------------------------------

    def begin_step(self, positions: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Announce the next appended tokens: their positions and which are real ``(B, Q)``."""
        bias = torch.where(token_mask, 0.0, MASKED).to(torch.float32)[:, None, :]
        self._step = (bias, positions)
        counted = token_mask.sum(dim=1)
        self.seen_tokens = counted if self.seen_tokens is None else self.seen_tokens + counted

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

    def attention_bias(self, layer_idx: int) -> torch.Tensor:
        """Additive bias ``(B, 1, N)`` of every key at ``layer_idx``, this step's tokens included."""
        return self.layers[layer_idx].bias

    # --- choosing, converting and moving entries ----------------------------------------------

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
        for layer in self.layers:
            layer.gather(index)
            if valid is not None:
                layer.bias = layer.bias.masked_fill(~valid[:, None, :], MASKED)

    def convert(self, mask: torch.Tensor, bias_mode: str) -> None:
        """Turn the entries where ``mask`` ``(B, N)`` is True into nuggets: their attention bias
        becomes their score (``plain``) or ``s - stopgrad(s)`` (``straight_through``)."""
        for layer in self.layers:
            bias = nugget_bias(layer.scores, bias_mode)[:, None, :]
            layer.bias = torch.where(mask[:, None, :], bias, layer.bias)
            layer.is_nugget = layer.is_nugget | mask

    def candidate_worth(
        self,
        *,
        tail: int = 0,
        lead: int | None = None,
        pool: int | None = None,
        observed: list[torch.Tensor] | None = None,
    ) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        """The candidates of :meth:`keep_top_entries` (arguments as there): per layer, their span
        ``(start, stop)`` and worth ``(B, H, stop - start)`` — the score, or with ``observed`` the better
        of the score's and the attention's percentile — with -inf where an entry is padding."""
        bounds, scores = self._candidate_scores(tail, lead, pool)
        return bounds, scores if observed is None else self._observed_worth(bounds, scores, observed)

    def _candidate_scores(
        self, tail: int, lead: int | None, pool: int | None
    ) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        """Per layer, the candidates' span and scorer scores ``(B, H, stop - start)`` (-inf: padding)."""
        bounds, pools = [], []
        for layer in self.layers:
            length, heads = layer.get_seq_length(), layer.kv_heads
            start = lead if lead is not None else length - tail - pool
            bounds.append((start, length - tail))
            scores = layer.scores if layer.scores.dim() == 3 else layer.scores[:, None, :].expand(-1, heads, -1)
            valid = (layer.bias > MASKED / 2).expand(-1, heads, -1)[..., start : length - tail]
            pools.append(scores[..., start : length - tail].masked_fill(~valid, float("-inf")))
        return bounds, pools

    def _observed_worth(
        self, bounds: list[tuple[int, int]], scores: list[torch.Tensor], observed: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The candidates' worth when recent queries vote: the better of the two percentiles."""
        shapes = [(self.batch_size, layer.kv_heads, layer.get_seq_length()) for layer in self.layers]
        if [tuple(seen.shape) for seen in observed] != shapes:
            raise ValueError("observed attention must hold one value per (layer, KV head, entry) of this cache")
        seen = [
            seen[..., start:stop].float().masked_fill(pool.isinf(), float("-inf"))
            for seen, (start, stop), pool in zip(observed, bounds, scores)
        ]
        return _blend_worth(scores, seen)

    def keep_top_entries(
        self,
        keep: torch.Tensor,
        rotary_emb: torch.nn.Module,
        *,
        tail: int = 0,
        lead: int | None = None,
        pool: int | None = None,
        bias_mode: str = "plain",
        observed: list[torch.Tensor] | None = None,
    ) -> None:
        """Per-head budgets (DESIGN §4): the candidate entries of every layer — after the first ``lead``
        entries, or the last ``pool`` before the ``tail`` — compete for ``keep`` ``(B,)`` K/V entries.
        With ``observed`` (per layer ``(B, H, entries)``: the attention recent queries gave each
        entry) :data:`SCORER_RESERVE` tokens' worth of them (× layers × heads) go first to the best
        scores over all layers and heads, and an entry's worth is the better of its score's and its
        attention's percentile among the candidates; without, the worth is the score. The rest goes
        by the slot rule: a layer's ``k``-th slot is worth its best head's ``k``-th candidate, the
        ``rest / heads`` best slots over all layers are opened, and a layer receives its opened
        slots' entries (slots · heads). Its best (head, entry) pairs fill that share, a head taking
        as many as its candidates win (at most :data:`HEAD_SLOTS` times the opened slots when set;
        1: every head fills them), each head's in text order. Only the pairs in use are stored
        (:meth:`NuggetLayer.pack`), so ``keep`` entries take the memory of a token-level cache
        keeping ``keep / (layers · heads)`` tokens, and each head is read at its own length.
        (Letting every entry compete across layers by worth recalled as well at 2k and continued
        1.6 ppl worse at 8k; spending a share of the budget, not a fixed reserve, on the scorer's
        picks did one or the other, ``benchmarks/reading/README.md``.) With cache positions a slot's
        keys are re-rotated to one position; with text positions each keeps its own. The last
        ``tail`` entries stay as they are."""
        if self.allocation != "head":
            raise ValueError("keep_top_entries spreads the budget over heads; this cache is token-level")
        bounds, scores = self._candidate_scores(tail, lead, pool)
        if observed is None:
            picks = layer_share_picks(scores, keep)
        else:
            reserve = (SCORER_RESERVE or 0) * len(self.layers) * self.layers[0].kv_heads
            picks = reserve_then_share(scores, self._observed_worth(bounds, scores, observed), keep, reserve)
        moved = rotary_emb if self.position_mode == "cache" else None
        for layer, (start, stop), chosen in zip(self.layers, bounds, picks):
            _regroup_layer(layer, start, stop, chosen, bias_mode, moved)
            layer.pack()

    def reposition(self, rotary_emb: torch.nn.Module) -> None:
        """Renumber each row's real entries 0, 1, 2, ... and re-rotate their keys to match, so the
        next token's position is the number of entries before it (DESIGN §4). In a per-head cache the
        nugget slots of each layer are spread evenly over :attr:`nugget_span` positions, so every
        layer numbers the raw tokens after them alike."""
        for layer in self.layers:
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
                packed = layer.packed
                layer.keys = rerotate(layer.keys, delta, rotary_emb)
                if packed:
                    layer.pack()
            layer.positions = target

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Rows in the cache (0 when empty)."""
        first = self.layers[0]
        return first.bias.shape[0] if first.is_initialized else 0

    def entry_counts(self) -> torch.Tensor:
        """Real (non-padding) entries per row, ``(B,)``, counting the nuggets of a per-head cache as
        their token-equivalent :attr:`nugget_span` (so this is also the next token's cache position)."""
        layer = self.layers[0]
        if layer.bias is None:
            return torch.zeros(0, dtype=torch.long)
        valid = (layer.bias > MASKED / 2).any(dim=1)
        return (valid & ~layer.is_nugget).sum(dim=1) + self.nugget_counts()

    def nugget_counts(self) -> torch.Tensor:
        """Nugget entries per row, ``(B,)`` (token-equivalents in a per-head cache)."""
        layer = self.layers[0]
        if layer.bias is None:
            return torch.zeros(0, dtype=torch.long)
        if self.nugget_span is not None:
            return self.nugget_span.to(layer.bias.device)
        return (layer.is_nugget & (layer.bias > MASKED / 2).any(dim=1)).sum(dim=1)

    def stored_entries(self) -> torch.Tensor:
        """K/V pairs in use per row, ``(B,)``, over every layer and KV head (masked slots excluded):
        ``entry_counts() · layers · kv_heads`` whether the budget is spread per token or per head."""
        total = torch.zeros(self.batch_size, dtype=torch.long)
        for layer in self.layers:
            if layer.is_initialized:
                total = total + (layer.bias > MASKED / 2).expand(-1, layer.kv_heads, -1).sum(dim=(1, 2)).cpu()
        return total

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: K/V (only those in use once packed), bias, positions and flags
        of every layer."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_tensors())

    def kv_nbytes(self) -> int:
        """Bytes of the stored keys and values alone."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_kv())

    # --- copies, devices, files ----------------------------------------------------------------

    def fork(self, detach: bool = False) -> NuggetCache:
        """A cache sharing these tensors; what is appended to the fork does not change this one."""
        twin = NuggetCache(len(self.layers), self.model_fingerprint, self.position_mode, self.allocation)
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


def layer_share_picks(
    pools: list[torch.Tensor], keep: torch.Tensor, head_slots: float | None = None
) -> list[torch.Tensor]:
    """The rule of :meth:`NuggetCache.keep_top_entries`: which of each layer's candidates ``(B, H, N)``
    (worth; -inf = none) it keeps, ``keep`` ``(B,)`` entries in all, each head at most ``head_slots``
    times its layer's opened slots (default :data:`HEAD_SLOTS`; None: no cap)."""
    heads = pools[0].shape[1]
    head_slots = head_slots or HEAD_SLOTS
    capped = head_slots is not None and head_slots < heads  # at `heads` a head may take its layer's whole share
    ranked = [p.sort(dim=2, descending=True, stable=True) for p in pools]  # each head's candidates, best first
    # a slot's worth: its layer's best head's candidate of that rank
    worth = torch.cat([values.amax(dim=1) for values, _ in ranked], dim=1)
    opened = _best(worth, torch.minimum(keep.to(worth.device) // heads, worth.isfinite().sum(dim=1)))
    picks = []
    for pool, (_, order), slots in zip(pools, ranked, opened.split([p.shape[2] for p in pools], 1)):
        opened_here = slots.sum(dim=1)
        if capped:
            cap = (opened_here.float() * head_slots).ceil().long()  # slots one head may fill
            positions = torch.arange(order.shape[2], device=order.device).expand_as(order)
            rank = torch.empty_like(order).scatter_(2, order, positions)  # each candidate's rank in its head
            pool = pool.masked_fill(rank >= cap[:, None, None], float("-inf"))
        pairs = pool.flatten(1)
        share = torch.minimum(opened_here * heads, pairs.isfinite().sum(dim=1))
        picks.append(_best(pairs, share).view_as(pool))
    return picks


def reserve_then_share(
    scores: list[torch.Tensor], worth: list[torch.Tensor], keep: torch.Tensor, reserve: int
) -> list[torch.Tensor]:
    """Which candidates (per layer ``(B, H, N)``; -inf = none) to keep, ``keep`` ``(B,)`` in all: the
    ``reserve`` best ``scores`` over all layers and heads (fewer when ``keep`` is), then the slot rule
    (:func:`layer_share_picks`) by ``worth`` over the candidates left for the rest."""
    keep = keep.to(scores[0].device)
    reserved = best_anywhere(scores, keep.clamp(max=reserve))
    left = keep - sum(r.flatten(1).sum(dim=1) for r in reserved)
    rest = layer_share_picks([w.masked_fill(r, float("-inf")) for w, r in zip(worth, reserved)], left)
    return [r | picked for r, picked in zip(reserved, rest)]


def best_anywhere(pools: list[torch.Tensor], count: torch.Tensor) -> list[torch.Tensor]:
    """Masks of each row's ``count`` ``(B,)`` best finite values over all of ``pools`` (per layer
    ``(B, H, N)``; -inf = none), whatever their layer and head (fewer when fewer are finite)."""
    flat = torch.cat([p.flatten(1) for p in pools], dim=1)
    best = _best(flat, torch.minimum(count.to(flat.device), flat.isfinite().sum(dim=1)))
    return [part.view_as(p) for part, p in zip(best.split([p[0].numel() for p in pools], 1), pools)]


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


def _best(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of each row's ``count`` ``(B,)`` largest ``values`` ``(B, N)`` (earlier ones win ties)."""
    order = values.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(values.shape[1], device=values.device) < count[:, None]
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, ranks)


def _percentiles(pools: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each finite value's rank among all finite values of ``pools`` (each ``(B, H, N)``), as a share
    in (0, 1]; -inf stays -inf."""
    flat = torch.cat([p.flatten(1) for p in pools], dim=1)
    finite = flat.isfinite()
    rank = torch.empty_like(flat).scatter_(
        1,
        flat.argsort(dim=1, stable=True),
        torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype).expand_as(flat),
    )
    missing = (~finite).sum(dim=1, keepdim=True)
    share = ((rank - missing + 1) / finite.sum(dim=1, keepdim=True).clamp(min=1)).masked_fill(~finite, float("-inf"))
    return [part.view_as(p) for part, p in zip(share.split([p[0].numel() for p in pools], dim=1), pools)]


def _blend_worth(scores: list[torch.Tensor], seen: list[torch.Tensor]) -> list[torch.Tensor]:
    """An entry's worth when both the scorer and the recent queries' attention vote: the better of its
    two percentiles."""
    return [torch.maximum(a, b) for a, b in zip(_percentiles(scores), _percentiles(seen))]


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
