"""KVzip's score of every context entry, computed directly (no kvpress): the frozen default model reads
the context, then "Repeat the previous context exactly." (chat-template suffix) and the context again;
an entry's score is the largest softmax attention any repeat query of its KV head's query heads pays it
(kvpress ``KVzipPress``, one chunk: the context is under its 2,048-token chunk). Also each token's
surprise (its negative log-likelihood in the plain prefill). Reports where the needle's entries rank
under KVzip, surprise, and which would survive KVzip's global 10 % keep.

    OMP_NUM_THREADS=1 PYTHONPATH=/work/before_pkg /work/main/.venv/bin/python benchmarks/needles/kvzip_rank.py

Writes ``kvzip_rank.json`` (and ``kvzip_scores.pt``, per sample (layers, KV heads, tokens), for the
other scripts; not committed).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from nugget2d.runtime.models import load_model  # noqa: E402

REPEAT = "\n\nRepeat the previous context exactly."
CHUNK = 256


def chat_suffix(tokenizer) -> list[int]:
    """What the chat template puts after a user turn, as kvpress's KVzip extracts it."""
    dummy, sep = "dummy context", "\n" + "#" * len("dummy context")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + sep}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text.split(sep)[1], add_special_tokens=False)


@torch.no_grad()
def kvzip_scores(model, tokenizer, context: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(scores (layers, kv_heads, n), surprise (n,), seconds)`` for context ids ``context``."""
    n = len(context)
    cfg = model.config
    layers, kv, groups = (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.num_attention_heads // cfg.num_key_value_heads,
    )
    scores = torch.zeros(layers, kv, n)
    cache = DynamicCache()
    started = time.perf_counter()
    out = model(input_ids=torch.tensor([context]), past_key_values=cache, use_cache=True)
    prefill_s = time.perf_counter() - started
    logp = out.logits[0, :-1].float().log_softmax(-1)
    surprise = torch.cat([torch.zeros(1), -logp.gather(1, torch.tensor(context[1:])[:, None])[:, 0]])
    repeat = tokenizer.encode(REPEAT, add_special_tokens=False) + chat_suffix(tokenizer) + context

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"]
        q_len = hidden.shape[1]
        keys = cache.layers[module.layer_idx].keys  # (1, kv, n + q_len, d), after this pass's update
        q = module.q_proj(hidden).view(1, q_len, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        q = q.view(1, kv, groups, q_len, module.head_dim)
        best = torch.zeros(kv, n)
        for begin in range(0, q_len, CHUNK):  # query chunks: the same max, a bounded attention matrix
            end = min(begin + CHUNK, q_len)
            logits = torch.matmul(q[..., begin:end, :], keys[:, :, None].transpose(-1, -2)) / math.sqrt(module.head_dim)
            rows = torch.arange(begin, end)[:, None]
            future = torch.arange(q_len)[None, :] > rows  # causal over the repeat's own keys
            logits[..., n:] = logits[..., n:].masked_fill(future, float("-inf"))
            best = torch.maximum(best, logits.softmax(dim=-1)[..., :n].amax(dim=(2, 3))[0])
        scores[module.layer_idx] = best
        return output

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    started = time.perf_counter()
    try:
        model.model(input_ids=torch.tensor([repeat]), past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    repeat_s = time.perf_counter() - started
    return scores, surprise, {"prefill_s": prefill_s, "repeat_s": repeat_s}


def pct(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among all of ``values`` as a share in (0, 1]."""
    flat = values.flatten()
    rank = torch.empty_like(flat).scatter_(0, flat.argsort(stable=True), torch.arange(1, flat.numel() + 1).float())
    return (rank / flat.numel()).view_as(values)


def main() -> None:
    model, tok = load_model(None)
    model.set_attn_implementation("sdpa")
    out, saved = [], {}
    wanted = {int(i) for i in sys.argv[1].split(",")} if len(sys.argv) > 1 else None
    for sample in common.samples(tok):
        if wanted is not None and sample.index not in wanted:
            continue
        context, _ = sample.split_ids(tok)
        nd = common.needle(tok, sample)
        scores, surprise, times = kvzip_scores(model, tok, context)
        saved[sample.index] = {"kvzip": scores.half(), "surprise": surprise}
        sinkless = scores.clone()
        sinkless[..., :4] = float("inf")
        p = pct(sinkless)
        kept = p > 0.9  # KVzip's global 10 %: the top tenth of (layer, head, token) entries
        sp = pct(surprise[4:])
        rec = {
            "index": sample.index,
            "times": times,
            "kvzip_pct": {
                part: [round(float(p[..., t].median()), 3) for t in getattr(nd, part)] for part in ("key", "value")
            },
            "kvzip_kept_pairs": {
                part: [int(kept[..., t].sum()) for t in getattr(nd, part)] for part in ("key", "value")
            },
            "kvzip_kept_by_layer_value": [int(kept[li][:, nd.value].sum()) for li in range(scores.shape[0])],
            "surprise_nats": {
                part: [round(float(surprise[t]), 2) for t in getattr(nd, part)] for part in ("key", "value")
            },
            "surprise_pct": {
                part: [round(float(sp[t - 4]), 3) for t in getattr(nd, part)] for part in ("key", "value")
            },
            "surprise_top_tokens": [
                tok.convert_ids_to_tokens(context[int(i) + 4]) for i in surprise[4:].topk(20).indices
            ],
        }
        out.append(rec)
        print(sample.index, times, rec["kvzip_kept_pairs"], rec["surprise_pct"]["value"], flush=True)
    torch.save(saved, common.HERE / "kvzip_scores.pt")
    common.write_json(
        "kvzip_rank.json",
        {"command": "PYTHONPATH=/work/before_pkg python benchmarks/needles/kvzip_rank.py", "samples": out},
    )


if __name__ == "__main__":
    main()
