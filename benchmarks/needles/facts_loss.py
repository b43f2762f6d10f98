"""How well each adapter answers planted facts at training length: the ``facts`` training objective's
examples (a 256-token segment holding one planted fact and a distractor segment compressed at 10 %, 4
raw sinks, 32 raw recent tokens, the question in the chat format) cut from a dev book, and the mean
cross-entropy of the answer's tokens that the question does not hold (the fact's value: digits, a name,
a time). Lower is better; the 8k planted-fact QA of ``bench quality`` is the user's measure, this is
the objective's own.

Run from the repository root (one torch thread):
``python benchmarks/needles/facts_loss.py --out benchmarks/needles/frontier/cotrain-qa/facts_loss.json \
ADAPTER...`` — appends one row per adapter to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.objectives import NuggetObjective
from nugget2d.runtime.train_data import Shape, build_examples, collate

BOOK = Path("benchmarks/data/dev/little-colonels-hero.txt")
SHAPE = Shape(segment=256, target=64, recent=32, sinks=4)  # the training runs' shape
EXAMPLES = 24


def value_cross_entropy(adapter: str) -> dict:
    """Mean cross-entropy (nats) over the value tokens of :data:`EXAMPLES` facts examples of :data:`BOOK`."""
    model, tokenizer = load_nugget2d(adapter=adapter)
    examples = build_examples([BOOK], tokenizer, "facts", SHAPE, plant_facts=1)
    examples = examples[:: max(1, len(examples) // EXAMPLES)][:EXAMPLES]
    objective = NuggetObjective(model, "ce").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            batch = collate([example], tokenizer.pad_token_id or 0)
            names = ("context", "context_mask", "sinks", "sinks_mask", "recent", "recent_mask")
            cache = objective.cache(*(batch[name] for name in names))
            logits = model(batch["input_ids"], nuggets=cache, attention_mask=batch["input_mask"]).logits[0]
            log_probs = logits.float().log_softmax(dim=-1)
            ids = batch["input_ids"][0].tolist()
            for at in range(len(example.prompt), len(ids)):
                if ids[at] not in example.prompt and ids[at] != tokenizer.eos_token_id:
                    total -= float(log_probs[at - 1, ids[at]])
                    count += 1
    return {"adapter": adapter, "value_cross_entropy": total / count, "value_tokens": count, "examples": len(examples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for adapter in args.adapters:
        row = value_cross_entropy(adapter) | {"date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["adapter"] != adapter] + [row]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
