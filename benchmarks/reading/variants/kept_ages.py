"""Where in the text each (layer, KV head) keeps its entries after reading one bench window.

Reads the first 4-window bench window of CONTEXT tokens (the held-out books, as ``bench quality``
does) with the shipped rule (``--reserve N``: a scorer reserve of N tokens' worth; 0 is the rule
shipped before 2026-11-30 afternoon), or with every entry competing across layers (``--global``,
``global_share.py`` at GLOBAL=1), makes room for the scored tokens, and writes per (layer, head) how
many kept entries come from each 1,024-token stretch of the text, as JSON. Diagnostic; one thread.
Usage (repository root): python benchmarks/reading/variants/kept_ages.py 8192 OUT.json [--global] [--reserve N]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.bench_common import load_token_texts
from nugget2d.runtime.bench_quality import QualityOptions, windows
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession

sys.path.insert(0, str(Path(__file__).parent))
import global_share  # noqa: E402

BUCKET = 1024  # text positions per count
BOOKS = ["../shared/data/corpus/little-colonels-hero.txt", "../shared/data/corpus/complete-angler.txt"]


def track_positions() -> dict[int, torch.Tensor]:
    """Make ``_regroup_layer`` keep, per layer object, each entry's text position ``(H, N)`` alongside."""
    origins: dict[int, torch.Tensor] = {}
    regroup = cache_module._regroup_layer

    def tracked(layer, start, stop, chosen, bias_mode, rotary_emb):
        heads, length = chosen.shape[1], layer.get_seq_length()
        known = origins.get(id(layer), torch.empty(heads, 0, dtype=torch.long))
        first = int(known.max()) + 1 if known.numel() else 0
        fresh = torch.arange(first, first + length - known.shape[1])
        known = torch.cat([known, fresh.expand(heads, -1)], dim=1)
        picked, used = cache_module.kept_in_text_order(chosen)
        middle = known[:, start:stop].gather(1, picked[0]).masked_fill(~used[0], -1)
        origins[id(layer)] = torch.cat([known[:, :start], middle, known[:, stop:]], dim=1)
        regroup(layer, start, stop, chosen, bias_mode, rotary_emb)

    cache_module._regroup_layer = tracked
    return origins


def main() -> None:
    """Read the window and write the kept entries' text positions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("context", type=int)
    parser.add_argument("out")
    parser.add_argument("--global", dest="compete", action="store_true", help="every entry competes across layers")
    parser.add_argument("--reserve", type=int, default=None, help="scorer reserve, tokens' worth per (layer, head)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.reserve is not None:
        cache_module.SCORER_RESERVE = args.reserve
    if args.compete:
        global_share.GLOBAL = 1.0
        cache_module.NuggetCache.keep_top_entries = global_share.keep_top_entries
    origins = track_positions()
    model, tokenizer = load_nugget2d()
    options = QualityOptions(methods=["nugget2d"], ratios=[0.1], contexts=[args.context], inputs=BOOKS)
    texts, _ = load_token_texts(tokenizer, options.inputs)
    window = windows(texts, args.context + options.continuation, options.samples)[0]
    shape = options.shape(("nugget2d", 0.1, args.context), options.window_reserve)
    session = StreamingSession(model, tokenizer, shape.settings(), chat=False)
    with torch.no_grad():
        session.ingest_ids(window[: args.context - 1], final=True)
        session._make_room_per_head(options.window_reserve, session._raw_when_asked(options.window_reserve))
    kept = {}
    for index, layer in enumerate(session.cache.layers):
        nuggets = (layer.bias[0] > cache_module.MASKED / 2) & layer.is_nugget[0][None, :]
        known = origins[id(layer)][:, : nuggets.shape[1]]
        positions = [known[head][nuggets[head, : known.shape[1]]] for head in range(known.shape[0])]
        kept[index] = [torch.bincount(p // BUCKET, minlength=-(-args.context // BUCKET)).tolist() for p in positions]
    rule = "global" if args.compete else f"reserve {cache_module.SCORER_RESERVE}"
    Path(args.out).write_text(json.dumps({"context": args.context, "rule": rule, "bucket": BUCKET, "counts": kept}))


if __name__ == "__main__":
    main()
