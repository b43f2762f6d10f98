"""One layer of the nugget cache: packed, ragged storage of K/V with per-entry bias, position, flags, scores
(and surprise, when a policy asks for it).

Hand-rolled because transformers' cache layers store dense K/V only; a per-head cache keeps a
different number of entries per KV head and stores only those in use (:meth:`NuggetLayer.pack`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .attention import MASKED
from .rope import rerotate, rotate_rows


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
    store dense K/V only.

    A sliding-window layer (``window``: the model's ``sliding_window``) holds raw entries only, never
    compressed: after each forward pass (:meth:`trim`) the last ``window - 1`` of them, what the next
    token reads besides itself, as transformers' sliding-window cache layers keep."""

    def __init__(self, window: int | None = None) -> None:
        #: The layer's sliding window (None: a global layer, whose entries a policy compresses).
        self.window = window
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        #: After :meth:`pack`: (keys in use ``(M, D)``, values in use ``(M, D)``, in use ``(B, Hkv, S)``)
        #: of the first ``S`` slots; ``_keys``/``_values`` then hold the entries appended since.
        self._packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: Per row and head, ``(keys, values, bias)`` of its packed slots in use, made on the first
        #: per-head read, with the bias of the packed slots it was made from (remade if that changes), and
        #: per row that bias padded to the row's longest head and the heads' reads (see :meth:`packed_row`).
        self._head_slots: tuple[list, torch.Tensor, list, list] | None = None
        #: Per packing, where each packed pair in use lands when heads are read padded (see :meth:`padded_heads`).
        self._padding: dict | None = None
        super().__init__()
        self.bias: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.is_nugget: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        #: Each entry's surprise (the negative log-likelihood of its token where it was read; -inf: not
        #: known), shaped like :attr:`scores`; None unless a policy asked for it (it is not stored otherwise).
        self.surprise: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        return self._whole(0)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if self._packed is not None:  # the values become whole; the keys are replaced, never rebuilt
            self._values = self._whole(1)
            self._drop_packing()
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        return self._whole(1)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if self._packed is not None:
            self._keys = self._whole(0)
            self._drop_packing()
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

    def _drop_packing(self) -> None:
        self._packed = self._head_slots = self._padding = None

    def _unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values whole, the layer unpacked (each rebuilt once when it was packed)."""
        if self._packed is not None:
            self._keys, self._values = self._whole(0), self._whole(1)
            self._drop_packing()
        return self._keys, self._values

    @property
    def sliding(self) -> bool:
        """Whether this is a sliding-window layer (raw entries only, never compressed)."""
        return self.window is not None

    def trim(self) -> None:
        """Keep a sliding-window layer's last ``window - 1`` entries (what the next query reads besides
        itself); a global layer stays as it is."""
        if self.window is None or not self.is_initialized or self.get_seq_length() < self.window:
            return
        keep = slice(-(self.window - 1), None) if self.window > 1 else slice(0, 0)
        keys, values = self._unpacked()
        self.keys, self.values = keys[:, :, keep], values[:, :, keep]
        self.bias, self.is_nugget = self.bias[..., keep], self.is_nugget[:, keep]
        self.positions, self.scores = self.positions[..., keep], self.scores[..., keep]
        if self.surprise is not None:
            self.surprise = self.surprise[..., keep]

    def pack(self) -> None:
        """Store only the K/V pairs in use (bias not masked); a layer without masked slots, or a
        sliding-window one, stays as it is."""
        if not self.is_initialized or self.bias is None or self.window is not None:
            return
        in_use = (self.bias > MASKED / 2).expand(-1, self.kv_heads, -1)
        if bool(in_use.all()):
            return
        keys, values = self.keys, self.values
        self._packed = (keys[in_use], values[in_use], in_use)
        self._head_slots = self._padding = None
        self._keys, self._values = keys[:, :, :0], values[:, :, :0]

    def head_entries(self, joined: bool = True) -> list[list[tuple]]:
        """Per row and KV head, ``(keys (n, D), values (n, D), bias (n,))`` of the entries that head
        reads, in order: its packed slots in use (none of the masked ones), then the entries appended
        since. Heads of a packed layer differ in ``n``; reading them so skips what :attr:`keys` rebuilds.
        ``joined=False`` gives each of the three as its parts, ``(packed slots, appended since)``, views
        of what the layer holds (nothing copied)."""
        batch, heads = self.bias.shape[0], self.kv_heads
        bias = self.bias.expand(batch, heads, -1)
        slots = self._packed[2].shape[-1] if self._packed is not None else 0
        packed = self._head_plan()[0] if self._packed is not None else None
        entries = []
        for row in range(batch):
            entries.append([])
            for head in range(heads):
                entry = (self._keys[row, head], self._values[row, head], bias[row, head, slots:])  # appended since
                if packed is not None:
                    parts = zip(packed[row * heads + head], entry)
                    entry = tuple(torch.cat(pair) if joined else pair for pair in parts)
                entries[-1].append(entry)
        return entries

    def _head_plan(self) -> tuple[list, torch.Tensor, list, list]:
        """A packed layer's :attr:`_head_slots`: per row and head its packed slots in use (views of the
        packed K/V and their bias), the slots' bias, and per row that bias padded and the heads' reads
        (:meth:`packed_row`); made once per packing (and again if the slots' bias changed since)."""
        slot_bias = self.bias.expand(-1, self.kv_heads, -1)[..., : self._packed[2].shape[-1]]
        if self._head_slots is None or not torch.equal(self._head_slots[1], slot_bias):
            used_keys, used_values, in_use = self._packed
            counts = in_use.sum(dim=2).flatten().tolist()
            split = list(zip(used_keys.split(counts), used_values.split(counts), slot_bias[in_use].split(counts)))
            heads, padded, reads = in_use.shape[1], [], []
            for row in range(in_use.shape[0]):
                own = split[row * heads : (row + 1) * heads]
                block = slot_bias.new_full((heads, 1, max(len(bias) for _, _, bias in own)), MASKED)
                for head, (_, _, bias) in enumerate(own):
                    block[head, 0, : len(bias)] = bias
                padded.append(block)
                reads.append([(keys.transpose(0, 1), values, len(keys)) for keys, values, _ in own])
            self._head_slots = (split, slot_bias, padded, reads)
        return self._head_slots

    def packed_row(self, row: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], torch.Tensor, tuple]:
        """Row ``row`` of a packed layer as a few queries read it: per KV head ``(keys (D, n_h) transposed,
        values (n_h, D), n_h)`` of its packed slots in use (views), their bias padded to the row's longest
        head ``(Hkv, 1, L)`` (:data:`MASKED` past each head's ``n_h``), both made once per packing, and the
        entries appended since, ``(keys (Hkv, T, D), values (Hkv, T, D), bias (1 | Hkv, T))`` (views)."""
        _, _, padded, reads = self._head_plan()
        slots = self._packed[2].shape[-1]
        appended = (self._keys[row], self._values[row], self.bias[row, :, slots:])
        return reads[row], padded[row], appended

    def slots_in_use(self) -> torch.Tensor:
        """``(B, Hkv, S)``: which of a packed layer's packed slots each head uses."""
        return self._packed[2]

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
        if self.surprise is not None:  # not known for these until set_surprise says
            self.surprise = torch.cat([self.surprise, torch.full_like(scores, float("-inf"))], dim=-1)

    def gather(self, index: torch.Tensor) -> None:
        """Keep entries ``index`` ``(B, M)`` of each row, in that order."""
        keys, values = self._unpacked()
        kv_index = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        self.keys, self.values = keys.gather(2, kv_index), values.gather(2, kv_index)
        self.bias = self.bias.gather(2, index[:, None, :].expand(-1, self.bias.shape[1], -1))
        per_head = index[:, None, :].expand(-1, self.positions.shape[1], -1) if self.positions.dim() == 3 else None
        self.positions = self.positions.gather(1, index) if per_head is None else self.positions.gather(2, per_head)
        self.is_nugget = self.is_nugget.gather(1, index)
        for name in ("scores", "surprise"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.dim() == 3:
                setattr(self, name, value.gather(2, index[:, None, :].expand(-1, value.shape[1], -1)))
            else:
                setattr(self, name, value.gather(1, index))

    def gather_heads(self, index: torch.Tensor, rotary_emb: torch.nn.Module | None) -> None:
        """Keep entry ``index[b, h, j]`` in slot ``j`` of head ``h`` (``index`` ``(B, H, M)``): each head
        keeps its own entries. With ``rotary_emb`` (cache positions) a slot's keys are re-rotated to the
        first head's position; without it (text positions) every key keeps its own, and ``positions``
        becomes ``(B, H, M)``. The caller sets the bias of the slots (which heads use them)."""
        keys, values = self._unpacked()
        heads = keys.shape[1]
        kv_index = index[..., None].expand(-1, -1, -1, keys.shape[-1])
        positions = self.positions if self.positions.dim() == 3 else self.positions[:, None, :].expand(-1, heads, -1)
        source = positions.gather(2, index)
        keys = keys.gather(2, kv_index)
        if rotary_emb is None:
            self.keys, self.positions = keys, source
        else:
            self.keys = rerotate(keys, source[:, :1] - source, rotary_emb)
            self.positions = source[:, 0]
        self.values = values.gather(2, kv_index)
        self.bias = self.bias.expand(-1, heads, -1).gather(2, index)
        for name in ("scores", "surprise"):
            value = getattr(self, name)
            if value is not None:
                value = value if value.dim() == 3 else value[:, None, :].expand(-1, heads, -1)
                setattr(self, name, value.gather(2, index))
        self.is_nugget = self.is_nugget.gather(1, index[:, 0])

    def shift_keys(self, delta: torch.Tensor, rotary_emb: torch.nn.Module) -> None:
        """Move every key by ``delta`` positions (``(B, N)`` or per head ``(B, H, N)``, over all slots): a
        packed layer's pairs in use and the entries appended since are moved where they lie, never rebuilt."""
        if self._packed is None:
            self.keys = rerotate(self._keys, delta, rotary_emb)
            return
        used_keys, used_values, in_use = self._packed
        shifts = (delta if delta.dim() == 3 else delta[:, None, :]).expand(*in_use.shape[:2], -1)
        slots = in_use.shape[-1]
        self._packed = (rotate_rows(used_keys, shifts[..., :slots][in_use], rotary_emb), used_values, in_use)
        self._keys = rerotate(self._keys, shifts[..., slots:], rotary_emb)
        self._head_slots = None  # views of the keys before the move

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
            **({"surprise": self.surprise} if self.surprise is not None else {}),
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
        surprise = [self.surprise] if self.surprise is not None else []
        return [*self.stored_kv(), *mask, self.bias, self.positions, self.is_nugget, self.scores, *surprise]

    def copy(self, detach: bool = False) -> NuggetLayer:
        """A new layer sharing these tensors, packed as they are (appending to it leaves this one as
        it is); ``detach`` drops their autograd history."""

        def share(value):
            return value.detach() if detach and value is not None else value

        twin = NuggetLayer(self.window)
        twin._keys, twin._values = share(self._keys), share(self._values)
        twin._packed = tuple(share(t) for t in self._packed) if self._packed is not None else None
        if self._head_slots is not None:
            split, slot_bias, padded, reads = self._head_slots
            twin._head_slots = (
                [tuple(share(t) for t in e) for e in split],
                share(slot_bias),
                [share(t) for t in padded],
                [[(share(k), share(v), n) for k, v, n in row] for row in reads],
            )
        twin._padding = self._padding  # integer plans of the same packing: shared, never changed in place
        for name in ("bias", "positions", "is_nugget", "scores", "surprise"):
            setattr(twin, name, share(getattr(self, name)))
        if self.is_initialized:
            twin.dtype, twin.device, twin.is_initialized = self._keys.dtype, self.device, True
        return twin
