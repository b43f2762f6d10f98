"""Per-head budgets (docs/design.md): each (layer, KV head) keeps its own nuggets inside the token budget."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer
from torch import nn

from nugget2d.compress import MASKED, Nugget2DConfig, Nugget2DModel, NuggetCache, biased_attention
from nugget2d.compress import attention as attention_module
from nugget2d.compress.attention import extra_column_attention, head_buckets, per_head_attention, sdpa_kernel
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.compress.policies import AttentionReceived, HeadAttentionReceived, PerHeadBudget
from nugget2d.runtime.session import StreamingSession, StreamSettings

SHAPE = StreamSettings(budget=64, recent=16, segment=16, sinks=2)


def _model(allocation: str = "head") -> Nugget2DModel:
    torch.manual_seed(0)
    return Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(allocation=allocation, scorer_layer=1))


def _text(length: int = 300) -> list[int]:
    return torch.randint(3, 60, (length,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "flash_column"])
def test_a_head_that_keeps_no_nugget_attends_only_to_its_raw_tokens(backend):
    """Head 1 masks the four nugget keys: it must equal attention over the raw keys alone."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 16, generator=generator)
    k = torch.randn(1, 2, 10, 16, generator=generator)
    v = torch.randn(1, 2, 10, 16, generator=generator)
    bias = torch.randn(1, 2, 10, generator=generator)
    bias[:, :, 4:] = 0.0  # raw tokens
    bias[:, 1, :4] = MASKED  # head 1 keeps none of the nuggets
    if backend == "flash_column":
        out = extra_column_attention(q, k, v, bias, 16**-0.5, True, kernel=sdpa_kernel)
    else:
        out = biased_attention(q, k, v, bias, backend=backend)
    reference = biased_attention(q, k, v, bias, backend="eager")
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    raw_only = biased_attention(q[:, 2:], k[:, 1:, 4:], v[:, 1:, 4:], None, backend="eager")
    torch.testing.assert_close(out[:, 2:], raw_only, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_heads_read_at_their_own_lengths_equal_heads_padded_with_masked_keys(backend):
    """Two rows, two KV heads keeping 3, 7, 0 and 5 of 7 slots, then 4 raw keys (the last 2 are the
    queries): reading each head's entries alone equals reading all 11 keys with the unused slots masked."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 2, 16, generator=generator)
    k = torch.randn(2, 2, 11, 16, generator=generator)
    v = torch.randn(2, 2, 11, 16, generator=generator)
    bias = torch.randn(2, 2, 11, generator=generator)
    bias[..., 7:] = 0.0
    kept = torch.tensor([[3, 7], [0, 5]])
    in_use = torch.arange(11) < kept[..., None]
    in_use[..., 7:] = True
    bias = bias.masked_fill(~in_use, MASKED)
    heads = [
        [(k[b, h][in_use[b, h]], v[b, h][in_use[b, h]], bias[b, h][in_use[b, h]]) for h in range(2)] for b in range(2)
    ]
    out = per_head_attention(q, heads, backend=backend)
    torch.testing.assert_close(out, biased_attention(q, k, v, bias, backend="eager"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("queries", "softcap"), [(1, None), (3, None), (2, 5.0)])
def test_a_head_read_in_parts_in_place_equals_its_joined_keys(queries, softcap):
    """Decoding reads a packed head's slots and its new entries where they lie (no copy of its K/V): the
    same as reading them joined, causal among the last queries, with a logit cap."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, queries, 16, generator=generator)
    k = torch.randn(1, 1, 13, 16, generator=generator)
    v = torch.randn(1, 1, 13, 16, generator=generator)
    bias = torch.randn(1, 1, 13, generator=generator)
    bias[..., 9:] = 0.0
    joined = biased_attention(q, k, v, bias, scaling=0.3, backend="eager", softcap=softcap)
    parts = [(t[0, 0, :9], t[0, 0, 9:]) for t in (k, v, bias)]
    in_place = attention_module.parts_attention(q[0], *parts, scaling=0.3, softcap=softcap)
    torch.testing.assert_close(in_place[None], joined, atol=1e-5, rtol=1e-5)
    heads = [[tuple(parts)]]
    out = per_head_attention(q, heads, scaling=0.3, backend="sdpa", softcap=softcap)
    torch.testing.assert_close(out, joined, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries", [1, 3])
@torch.no_grad()
def test_a_packed_layer_read_for_decoding_in_one_block_equals_it_read_head_by_head(queries):
    """Decoding reads a packed layer's heads into one padded logits block per row: the same attention as
    each head read alone over its own entries, for one token and a few (causal among them)."""
    layer = _ragged_session().cache.layers[0]
    layer.append(*(torch.randn(1, 2, 5, 16) for _ in range(2)), torch.zeros(1, 1, 5), torch.arange(5)[None] + 500)
    query = torch.randn(1, 4, queries, 16, generator=torch.Generator().manual_seed(3))
    head_by_head = per_head_attention(query, layer.head_entries(), scaling=0.3, backend="eager")
    torch.testing.assert_close(
        attention_module.packed_decode_attention(query, layer, scaling=0.3), head_by_head, atol=1e-5, rtol=1e-5
    )


def test_heads_of_close_lengths_share_a_call_and_far_ones_do_not():
    assert head_buckets([100, 100, 100], 50.0) == [(0, 1, 2)]
    assert head_buckets([10, 1000, 5000], 100.0) == [(0,), (1,), (2,)]
    assert head_buckets([1010, 10, 1000], 100.0) == [(1,), (0, 2)]  # sorted by length, each group in head order
    assert head_buckets([10, 1000, 5000], float("inf")) == [(0, 1, 2)]
    assert head_buckets([10, 1000, 5000], 1e6) == [(0, 1, 2)]  # calls dearer than any padding


def _ragged_session(device: str = "cpu") -> StreamingSession:
    """A per-head session whose packed layers keep 18 and 223, 69 and 18 entries in their two KV heads."""
    model = _model().to(device)
    session = StreamingSession(model, tiny_tokenizer(), SHAPE, chat=False)
    session.ingest_ids(_text(), final=True)
    lengths = [layer.head_lengths() for layer in session.cache.layers if layer.packed]
    assert lengths == [[18, 223], [69, 18]]
    return session


def test_padded_heads_hold_each_heads_entries_then_masked_slots_then_the_new_entries():
    cache = _ragged_session().cache
    layer = cache.layers[0]
    entries = layer.head_entries()[0]
    for heads in [(0, 1), (0,), (1,)]:
        keys, values, bias = layer.padded_heads(heads)
        longest, tail = max(layer.head_lengths()[h] for h in heads), layer._keys.shape[2]
        assert keys.shape[:3] == values.shape[:3] == (1, len(heads), longest + tail) == bias.shape
        for local, head in enumerate(heads):
            own = layer.head_lengths()[head]
            for got, want in zip((keys, values, bias), entries[head]):
                torch.testing.assert_close(got[0, local, :own], want[:own])
                torch.testing.assert_close(got[0, local, longest:], want[own:])
            assert bool((bias[0, local, own:longest] == MASKED).all()) and not keys[0, local, own:longest].any()


def _reads(device: str) -> list:
    return [
        pytest.param(backend, how, cost, device, marks=[pytest.mark.gpu] if device == "cuda" else [])
        for backend in ("eager", "sdpa", "flex")
        for how, cost in [("loop", 0.0), ("buckets", 0.0), ("buckets", float("inf")), ("whole", 0.0)]
    ]


@pytest.mark.parametrize(("backend", "how", "cost", "device"), _reads("cpu") + _reads("cuda"))
@torch.no_grad()
def test_every_read_of_ragged_heads_equals_eager_head_by_head(monkeypatch, backend, how, cost, device):
    """A packed layer read head by head, in length buckets (cost 0: each head alone; inf: one padded call
    per layer) or rebuilt whole gives eager's per-head logits, for a question (causal) and one token."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    session = _ragged_session(device)
    model, cache = session.model, session.cache
    question = torch.tensor([_text(30)[:6]], device=device)
    monkeypatch.setitem(attention_module.HEAD_READS, "eager", "loop")
    model.set_attention("eager")
    reference = model(question, nuggets=cache)
    following = torch.tensor([[int(reference.logits[0, -1].argmax())]], device=device)
    expected = model(following, nuggets=returned_cache(reference)).logits
    monkeypatch.setitem(attention_module.HEAD_READS, backend, how)
    monkeypatch.setitem(attention_module.CALL_COST, backend, cost)
    model.set_attention(backend)
    out = model(question, nuggets=cache)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(following, nuggets=returned_cache(out)).logits, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_attention_watched_on_a_packed_layer_head_by_head_equals_it_watched_whole():
    """The observer of a packed layer reads each head where its entries lie: the attention it records per
    slot equals what it records over the layer rebuilt with its masked slots (0 at those)."""
    cache = _ragged_session().cache
    layer = cache.layers[0]
    layer.append(*(torch.randn(1, 2, 5, 16) for _ in range(2)), torch.zeros(1, 1, 5), torch.arange(5)[None] + 500)
    query = torch.randn(1, 4, 5, 16, generator=torch.Generator().manual_seed(3))
    whole, by_head = HeadAttentionReceived(3), HeadAttentionReceived(3)
    whole(0, query, layer.keys, layer.bias, 0.25)
    by_head.observe_packed(0, query, layer, 0.25)
    torch.testing.assert_close(by_head.by_layer[0], whole.by_layer[0], atol=1e-6, rtol=1e-5)
    assert bool((by_head.by_layer[0][~(layer.bias > MASKED / 2)] == 0).all())


@pytest.mark.parametrize("reserve", [PerHeadBudget.scorer_first, 2, 0])
def test_per_head_budgets_store_only_the_entries_in_use(reserve):
    """Streamed far past the budget: the K/V pairs stored are exactly the entries in use, as many as a
    token-level cache of the same entries holds; ``nbytes`` counts every stored tensor; layers differ
    in length — whether the scorer's reserve takes the whole budget (the shipped size, for this tiny
    model), part of it, or none."""
    model = _model()
    session = StreamingSession(model, tiny_tokenizer(), SHAPE, chat=False)
    assert session.allocation == "head" and session.policy == PerHeadBudget()
    session.policy = PerHeadBudget(scorer_first=reserve)
    text = _text()
    heads = model.num_layers * model.num_kv_heads
    pair = 2 * model.base.config.head_dim * 4  # fp32 key + value of one (layer, head, entry)
    for begin in range(0, len(text), 16):
        session.ingest_ids(text[begin : begin + 16], final=False)
        cache = session.cache
        entries = int(cache.entry_counts()[0])
        in_use = int(cache.stored_entries()[0])
        assert entries <= SHAPE.budget and in_use <= entries * heads
        assert cache.kv_nbytes() == in_use * pair  # masked slots hold no K/V
    assert in_use == entries * heads  # the budget is used to the last entry here
    assert len({layer.get_seq_length() for layer in cache.layers}) > 1  # spread unevenly over layers
    assert cache.nbytes == sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.stored_tensors())
    positions = cache.layers[0].positions[0]
    assert int(positions.max()) == entries - 1  # numbered within the budget whatever the text length
    assert torch.isfinite(session.score_ids(text[:12])).all()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@torch.no_grad()  # flex has no backward on CPU
def test_a_head_without_candidates_stores_nothing_and_reads_the_same(tmp_path, backend):
    """Layer 0's head 0 alone has candidates: it takes the layer's share, head 1's slots stay empty and
    hold no K/V (packed); reading the packed cache (each head at its own length, or rebuilt whole for
    flex) equals reading it unpacked, and a saved cache loads packed again."""
    model = _model()
    model.set_attention(backend)
    heads = model.num_kv_heads
    cache = model.encode(torch.tensor([_text(20)]), cache=model.new_cache(positions="cache"))
    for index, layer in enumerate(cache.layers):
        layer.scores = torch.zeros(1, heads, 20)
        layer.bias = torch.full((1, heads, 20), MASKED)
        if index == 0:
            layer.scores[:, 0] = torch.arange(20.0)
            layer.bias[:, 0] = 0.0
    PerHeadBudget().keep(cache, torch.tensor([10]), model.rotary_emb, pool=20)  # 5 slots opened; head 0 takes all 10
    first = cache.layers[0]
    assert first.packed and first.get_seq_length() == 10 and int(cache.stored_entries()[0]) == 10
    pair = 2 * model.base.config.head_dim * 4
    assert cache.kv_nbytes() == 10 * pair
    assert first.scores[0, 0].tolist() == [float(i) for i in range(10, 20)]
    dense = cache.fork()
    for layer in dense.layers:
        layer.keys = layer.keys  # assigning unpacks: the empty slots become stored zeros
    assert not any(layer.packed for layer in dense.layers) and dense.kv_nbytes() == 20 * pair
    question = torch.tensor([_text(30)[:6]])
    torch.testing.assert_close(model(question, nuggets=cache).logits, model(question, nuggets=dense).logits)
    loaded = NuggetCache.load(cache.save(tmp_path / "c.safetensors"))
    assert loaded.layers[0].packed and loaded.kv_nbytes() == cache.kv_nbytes()
    torch.testing.assert_close(model(question, nuggets=loaded).logits, model(question, nuggets=cache).logits)


class _SharedScores(nn.Module):
    """A scorer giving every (layer, head) the same score: later tokens of a segment score higher (the
    token-level rule always keeps a block's last token), ties broken by the token's features."""

    def __init__(self, heads: tuple[int, int] | None) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        order = torch.arange(hidden.shape[1], dtype=torch.float32) + 0.01 * hidden[..., 0].float().tanh()
        return order if self.heads is None else order[..., None, None].expand(-1, -1, *self.heads)


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_per_head_budgets_with_equal_head_scores_equal_token_nuggets(positions):
    """When every head scores tokens alike (and the scorer alone chooses), spreading the budget per head
    keeps the same tokens in every layer and head: the same log-probabilities as the token-level cache,
    with either numbering."""
    torch.manual_seed(0)
    text, question = _text(200), _text(30)[:12]
    results = {}
    for allocation in ("token", "head"):
        model = _model()
        model.scorer = _SharedScores((model.num_layers, model.num_kv_heads) if allocation == "head" else None)
        # blocks leaving the raw window are whole segments, so both rules see the same candidates
        settings = StreamSettings(
            budget=64, recent=16, segment=16, sinks=0, allocation=allocation, positions=positions, observation_window=0
        )
        session = StreamingSession(model, tiny_tokenizer(), settings, chat=False)
        session.ingest_ids(text)
        results[allocation] = session.score_ids(question)
    torch.testing.assert_close(results["head"], results["token"], atol=1e-4, rtol=1e-4)


def test_a_per_head_session_saves_and_answers_the_same(tmp_path):
    model = _model()
    session = StreamingSession(model, tiny_tokenizer(), SHAPE, chat=False)
    session.ingest_ids(_text())
    session.save(tmp_path / "doc")
    again = StreamingSession.load(tmp_path / "doc", model, tiny_tokenizer())
    assert again.allocation == "head" and again.cache.allocation == "head"
    question = _text(30)[:10]
    torch.testing.assert_close(again.score_ids(question), session.score_ids(question))


def test_per_head_budgets_need_a_per_head_scorer_and_the_nugget2d_policy():
    with pytest.raises(ValueError, match="per-head scorer|scores every"):
        StreamingSession(_model("token"), tiny_tokenizer(), StreamSettings(**{**vars(SHAPE), "allocation": "head"}))
    with pytest.raises(ValueError, match="policy that scores heads"):
        StreamSettings(budget=64, recent=16, segment=16, allocation="head", policy="snapkv")
    token = StreamingSession(
        _model(), tiny_tokenizer(), StreamSettings(budget=64, recent=16, segment=16, policy="snapkv")
    )
    assert token.allocation == "token"  # auto: per-head scores only serve the nugget2d policy


def test_compress_spreads_a_batch_over_heads_and_renumbers_it():
    model = _model()
    ids = torch.tensor([_text(40), _text(40)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :10] = False  # left padding
    cache = model.compress(ids, mask, cache=model.new_cache(positions="cache"), ratio=0.25)
    assert cache.nugget_counts().tolist() == [10, 8]
    heads = model.num_layers * model.num_kv_heads
    for row, nuggets in enumerate([10, 8]):
        assert int(cache.stored_entries()[row]) <= nuggets * heads
    pair = 2 * model.base.config.head_dim * 4
    assert cache.kv_nbytes() == int(cache.stored_entries().sum()) * pair  # padding and unused slots: no K/V
    out = model(torch.tensor([[5, 6], [7, 8]]), nuggets=cache)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("head_slots", [None, 1.0])
def test_a_layers_share_goes_to_its_best_head_entries_or_fills_every_head(head_slots):
    """Layer 0's head 0 scores 100 … 119, its head 1 0 … 19; no other layer has candidates. A budget of
    8 entries opens 4 slots (2 KV heads), all in layer 0 for head 0's scores. Uncapped (the default),
    the layer's 8 entries go to its best (head, entry) pairs: head 0 keeps 112 … 119, head 1 nothing,
    and the layer is read 8 long for head 0, stored packed. With a cap of 1 both heads fill the 4
    slots with their own best: head 1 keeps 16 … 19 though head 0's fifth best outscores them.
    2026-11-30 it kept nothing and its 4 slots were stored empty). No room: every nugget goes."""
    rule = PerHeadBudget(head_cap=head_slots)
    model = _model()
    heads, layers = model.num_kv_heads, model.num_layers
    cache = model.encode(torch.tensor([_text(20)]), cache=model.new_cache(positions="cache"))
    for index, layer in enumerate(cache.layers):
        layer.bias = torch.full((1, heads, 20), MASKED)
        layer.scores = torch.zeros(1, heads, 20)
        if index == 0:
            layer.bias[:] = 0.0
            layer.scores[:, 0], layer.scores[:, 1] = torch.arange(100.0, 120.0), torch.arange(20.0)
    rule.keep(cache, torch.tensor([8]), model.rotary_emb, pool=20)
    first = cache.layers[0]
    assert int(cache.stored_entries()[0]) == 8
    if head_slots is None:
        assert first.scores[0, 0].tolist() == [float(s) for s in range(112, 120)]
        assert first.packed and bool((first.bias[0, 1] == MASKED).all())
        assert [layer.get_seq_length() for layer in cache.layers] == [8] + [0] * (layers - 1)
    else:
        assert first.scores[0, 0].tolist() == [116.0, 117.0, 118.0, 119.0]
        assert first.scores[0, 1].tolist() == [16.0, 17.0, 18.0, 19.0]
        assert not first.packed
        assert [layer.get_seq_length() for layer in cache.layers] == [4] + [0] * (layers - 1)
    rule.keep(cache, torch.tensor([0]), model.rotary_emb, lead=0)
    assert [layer.get_seq_length() for layer in cache.layers] == [0] * layers


def test_with_text_positions_each_head_keeps_its_own_keys_unmoved():
    """positions='original': a kept entry's key is the one the model computed at its own text position
    (never re-rotated), each head keeps its best-scoring entries in text order, and the cache answers."""
    model = _model()
    heads, layers = model.num_kv_heads, model.num_layers
    cache = model.encode(torch.tensor([_text(40)]), cache=model.new_cache(positions="original"))
    scores = torch.randn(layers, 1, heads, 40, generator=torch.Generator().manual_seed(3))
    keys = []
    for layer, own in zip(cache.layers, scores):
        layer.scores = own.clone()
        keys.append(layer.keys.clone())
    PerHeadBudget().keep(cache, torch.tensor([8 * heads * layers]), model.rotary_emb, pool=40)
    kept = 0
    for layer, before, own in zip(cache.layers, keys, scores):
        for head in range(heads):
            used = layer.bias[0, head] > MASKED / 2
            picked = [int(torch.nonzero((before[0, head] == k).all(dim=-1))[0]) for k in layer.keys[0, head, used]]
            assert picked == sorted(picked)  # text order, each key bit for bit where the model computed it
            assert layer.scores[0, head, used].tolist() == own[0, head, picked].tolist()
            if picked:  # a head keeps its best entries
                assert float(own[0, head, picked].min()) >= float(own[0, head].topk(len(picked)).values.min())
            kept += len(picked)
    assert 0 < kept <= 8 * heads * layers
    out = model(torch.tensor([[5, 6]]), nuggets=cache)
    assert torch.isfinite(out.logits).all()


def test_auto_positions_keep_text_positions_until_the_window_then_renumber_exactly():
    """``auto``: a per-head session keeps each head's keys at their text positions while the text fits
    the model's window (256 here); past it the cache is renumbered by entries, every key re-rotated
    from its own head's position (undoing the rotation gives the key back), and reading goes on."""
    from nugget2d.compress.rope import rerotate

    model = _model()
    session = StreamingSession(model, tiny_tokenizer(), SHAPE, chat=False)
    assert SHAPE.positions == "auto" and session.cache.position_mode == "original"
    text = _text(400)
    session.ingest_ids(text[:200])
    per_head = [layer for layer in session.cache.layers if layer.positions.dim() == 3]
    assert per_head and any(bool((layer.positions[:, 0] != layer.positions[:, 1]).any()) for layer in per_head)
    assert int(max(layer.positions.max() for layer in session.cache.layers)) > SHAPE.budget
    before = [(layer.keys.clone(), layer.positions.clone()) for layer in session.cache.layers]
    session.ingest_ids(text[200:280])  # 280 > 256: renumbered before these are read
    assert session.cache.position_mode == "cache"
    session.ingest_ids(text[280:])
    assert int(max(layer.positions.max() for layer in session.cache.layers)) < SHAPE.budget
    assert torch.isfinite(session.score_ids(text[:12])).all()
    twin = StreamingSession(model, tiny_tokenizer(), SHAPE, chat=False)
    twin.ingest_ids(text[:200])
    twin.cache.position_mode = "cache"
    twin.cache.reposition(model.rotary_emb)
    for layer, (keys, positions) in zip(twin.cache.layers, before):
        target = layer.positions[:, None, :] if positions.dim() == 3 else layer.positions
        torch.testing.assert_close(
            rerotate(layer.keys, positions - target, model.rotary_emb), keys, atol=1e-5, rtol=1e-5
        )


def test_the_last_queries_attention_is_recorded_per_kv_head():
    """``HeadAttentionReceived`` holds, per KV head, the softmax attention of the last ``window`` causal
    queries summed over them and the head's query heads: what :class:`AttentionReceived` sums over all."""
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 6, 8, generator=generator), torch.randn(1, 2, 10, 8, generator=generator)
    per_head, total = HeadAttentionReceived(window=3), AttentionReceived(window=3)
    per_head(0, q, k, None, 0.5)
    total(0, q, k, None, 0.5)
    seen = per_head.layers(1)[0]
    expected = torch.zeros(1, 2, 10)
    for head in range(4):
        for row in range(3, 6):  # query row r is key 4 + r: it sees keys 0 … 4 + r
            visible = 4 + row + 1
            weights = (q[0, head, row] @ k[0, head // 2, :visible].T * 0.5).softmax(dim=-1)
            expected[0, head // 2, :visible] += weights
    torch.testing.assert_close(seen, expected)
    torch.testing.assert_close(seen.sum(dim=1), total.total)
    with pytest.raises(RuntimeError, match="layers \\[1\\]"):
        per_head.layers(2)


@pytest.mark.parametrize("reserve", [0, 2])
def test_entries_the_last_queries_read_stay_beside_the_scorer_best(reserve):
    """Layer 0's head 0 holds 20 candidates scored 0 … 19; the recent queries read entry 0 most. With
    their attention voting, entry 0 (the scorer's worst) stays with the scorer's best; without, it goes.
    A scorer reserve as large as the budget (2 tokens' worth: 16 entries of the tiny model's 4 layers ×
    2 heads) gives every entry to the scorer's best, votes or not."""
    rule = PerHeadBudget(scorer_first=reserve)
    model = _model()
    heads = model.num_kv_heads
    kept = {}
    for voting in (False, True):
        cache = model.encode(torch.tensor([_text(20)]), cache=model.new_cache(positions="original"))
        observed = []
        for index, layer in enumerate(cache.layers):
            layer.scores = torch.zeros(1, heads, 20)
            layer.bias = torch.full((1, heads, 20), MASKED)
            seen = torch.zeros(1, heads, 20)
            if index == 0:
                layer.scores[:, 0] = torch.arange(20.0)
                layer.bias[:, 0] = 0.0
                seen[:, 0] = torch.linspace(1.0, 0.0, 20)
            observed.append(seen)
        rule.keep(cache, torch.tensor([12]), model.rotary_emb, pool=20, observed=observed if voting else None)
        layer = cache.layers[0]
        kept[voting] = layer.positions[0, 0, layer.bias[0, 0] > MASKED / 2].tolist()
    assert kept[False] == list(range(8, 20))  # head 0 takes the layer's whole share of 12
    if reserve:
        assert kept[True] == list(range(8, 20))
    else:
        assert 0 in kept[True] and 19 in kept[True] and len(kept[True]) == 12
    with pytest.raises(ValueError, match="one value per"):
        rule.keep(cache, torch.tensor([heads]), model.rotary_emb, pool=2, observed=[torch.zeros(1, 1, 3)])


def test_the_scores_first_take_the_best_anywhere_and_the_per_layer_split_the_rest():
    """Two layers of 2 heads, 6 candidates each. Layer A's head 0 scores best (9, 8) but is worth
    little to the slot rule; layer B's head 0 is worth most (0.9 … 0.4). Keeping 6 with 2 reserved:
    A's head 0 keeps its two best scores, and the 4 left open 2 slots of layer B, whose best pairs are
    its head 0's first four. Without the reserve layer B takes all 6; a budget of 1 is all reserve."""
    scores = [torch.zeros(1, 2, 6), torch.ones(1, 2, 6)]
    scores[0][0, 0, :2] = torch.tensor([9.0, 8.0])
    worth = [torch.full((1, 2, 6), 0.1), torch.stack([torch.linspace(0.9, 0.4, 6), torch.linspace(0.35, 0.1, 6)])[None]]
    picks = PerHeadBudget().score_first_then_split(scores, worth, torch.tensor([6]), 2)
    assert picks[0][0, 0].nonzero().flatten().tolist() == [0, 1] and not picks[0][0, 1].any()
    assert picks[1][0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3] and not picks[1][0, 1].any()
    unreserved = PerHeadBudget().score_first_then_split(scores, worth, torch.tensor([6]), 0)
    assert not unreserved[0].any() and unreserved[1][0, 0].all()
    one = PerHeadBudget().score_first_then_split(scores, worth, torch.tensor([1]), 2)
    assert one[0][0, 0].nonzero().flatten().tolist() == [0] and sum(int(p.sum()) for p in one) == 1


def test_a_session_keeps_the_last_queries_attention_until_its_cache_changes(tmp_path):
    """After each segment the session holds one record per layer, matching the cache's entries; asking
    uses it up; a saved session carries it, so the loaded one compacts exactly alike."""
    model = _model()
    session = StreamingSession(model, tiny_tokenizer(), SHAPE, chat=False)
    session.ingest_ids(_text())
    assert [tuple(seen.shape) for seen in session.observed] == [
        tuple(layer.keys.shape[:3]) for layer in session.cache.layers
    ]
    session.save(tmp_path / "doc")
    question = _text(30)[:10]
    answers = [StreamingSession.load(tmp_path / "doc", model, tiny_tokenizer()).score_ids(question)]
    (tmp_path / "doc" / "observed.safetensors").unlink()
    answers.append(StreamingSession.load(tmp_path / "doc", model, tiny_tokenizer()).score_ids(question))
    scored = session.score_ids(question)
    assert session.observed is None
    torch.testing.assert_close(answers[0], scored)
    assert not torch.allclose(answers[1], scored)  # the scorer alone keeps other entries here
    quiet = StreamingSession(model, tiny_tokenizer(), StreamSettings(**{**vars(SHAPE), "observation_window": 0}))
    quiet.ingest_ids(_text())
    assert quiet.observed is None
