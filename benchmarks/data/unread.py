"""Which parts of the training books the shipped adapter never read.

Rebuilds, with the training code itself, the examples of the three runs that made the shipped
adapter (their configs are in ``training/*/config.json``), replays which of them each run's
steps drew, and prints, per book, the share of its tokens read and its longest unread stretches.
``--write DIR`` writes each book's unread stretches of at least ``--min-tokens`` tokens, in order,
to ``DIR/NAME-unread.txt``. Run from the repository root:

    python benchmarks/data/unread.py --corpus PATH_TO_BOOKS [--write benchmarks/data/test --skip debian-guide.txt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nugget2d.runtime.models import load_model
from nugget2d.runtime.texts import read_text_file
from nugget2d.runtime.train import TrainConfig, training_examples
from nugget2d.runtime.train_data import batch_at, sentence_segments

RUNS = ("scorer-r0.1-head", "encoder-r0.1-head", "encoder-r0.1-head-cache")
KEY = 48  # tokens that identify a segment by its start


def run_configs(root: Path) -> list[dict]:
    """The saved config of each run, with the steps the shipped adapter took from it."""
    return [json.loads((root / "training" / name / "config.json").read_text()) for name in RUNS]


def read_segments(config: dict, corpus: Path, tokenizer) -> dict[str, set[int]]:
    """Per book, the indices of the segments (of ``segment_size`` tokens) the run's steps read."""
    books = [corpus / Path(p).name for p in config["data"]]
    run = TrainConfig.from_saved(config, data=[str(book) for book in books])
    train, _ = training_examples(run, tokenizer)
    index: dict[tuple[int, ...], list[tuple[str, int]]] = {}
    for book in books:
        ids = tokenizer(read_text_file(book), add_special_tokens=False, verbose=False).input_ids
        for i, seg in enumerate(sentence_segments(ids, tokenizer, run.segment_size)):
            index.setdefault(tuple(seg[:KEY]), []).append((book.name, i))
    span = {"continue": 2, "recall": 3}
    read: dict[str, set[int]] = {b.name: set() for b in books}
    for step in range(config["steps"]):
        for ex in batch_at(train, step, config["batch_size"], config["seed"]):
            start = tuple((ex.sinks + ex.context)[:KEY]) if ex.objective != "scorer" else tuple(ex.context[:KEY])
            for name, i in index[start]:
                read[name].update(range(i, i + span.get(ex.objective, 1)))
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--min-tokens", type=int, default=2048)
    parser.add_argument("--skip", default="", help="comma-separated books not to write (their licence)")
    args = parser.parse_args()
    _, tokenizer = load_model()
    read_chars: dict[str, list[tuple[int, int]]] = {}
    for config in run_configs(Path.cwd()):
        for name, segs in read_segments(config, args.corpus, tokenizer).items():
            text = read_text_file(args.corpus / name)
            enc = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
            ids, offsets = enc.input_ids, enc.offset_mapping
            bounds, start = [], 0
            for seg in sentence_segments(ids, tokenizer, config["segment_size"]):
                bounds.append((offsets[start][0], offsets[start + len(seg) - 1][1]))
                start += len(seg)
            read_chars.setdefault(name, []).extend(bounds[i] for i in segs)
    report = {}
    for name, spans in sorted(read_chars.items()):
        text = read_text_file(args.corpus / name)
        mask = bytearray(len(text))
        for a, b in spans:
            mask[a:b] = b"\x01" * (b - a)
        gaps, i = [], 0
        while i < len(text):
            if mask[i]:
                i += 1
                continue
            j = i
            while j < len(text) and not mask[j]:
                j += 1
            gaps.append((i, j))
            i = j
        tokens = [(a, b, len(tokenizer(text[a:b], add_special_tokens=False).input_ids)) for a, b in gaps]
        long = [g for g in tokens if g[2] >= args.min_tokens]
        report[name] = {
            "chars": len(text),
            "read_share": round(sum(mask) / len(text), 3),
            "longest_unread_tokens": sorted((g[2] for g in tokens), reverse=True)[:5],
            "unread_tokens_in_stretches": sum(g[2] for g in long),
        }
        if args.write and long and name not in args.skip.split(","):
            args.write.mkdir(parents=True, exist_ok=True)
            stem = name.removesuffix(".txt")
            (args.write / f"{stem}-unread.txt").write_text("\n\n".join(text[a:b].strip() for a, b, _ in long) + "\n")
    print(json.dumps(report, indent=1))
    if args.write:
        (args.write.parent / "unread.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
