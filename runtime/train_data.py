"""Training data: plain text into sentence-snapped token segments, then (context, target) examples
per objective, a deterministic order by seed, and a held-out split."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .texts import read_text_file

OBJECTIVES = ("autoencode", "continue")
_SENTENCE_END = (".", "!", "?", "\n", '."', '?"', '!"')


@dataclass(frozen=True)
class Example:
    """Compress ``context``; then the decoder reads ``[opener] + target`` and learns ``target``."""

    context: tuple[int, ...]
    opener: int
    target: tuple[int, ...]


def text_files(paths: list[str | Path]) -> list[Path]:
    """The ``.txt`` files named or found under directories; ``ValueError`` for a missing path."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"training data path {path} does not exist")
    if not found:
        raise ValueError(f"no .txt files found in {[str(p) for p in paths]}")
    return found


def sentence_segments(ids: list[int], tokenizer, size: int, slack: float = 0.25) -> list[list[int]]:
    """Cut ``ids`` into segments of at most ``size`` tokens, each ending after the last sentence
    end within its final ``slack`` fraction when there is one (the paper snaps to punctuation)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    segments, start = [], 0
    while len(ids) - start > size:
        end = start + size
        for cut in range(end, start + int(size * (1 - slack)), -1):
            if pieces[cut - 1].replace("Ġ", " ").replace("Ċ", "\n").rstrip(" ").endswith(_SENTENCE_END):
                end = cut
                break
        segments.append(ids[start:end])
        start = end
    if len(ids) - start >= size // 2:
        segments.append(ids[start:])
    return segments


def build_examples(
    paths: list[str | Path], tokenizer, objective: str, segment_size: int, target_size: int
) -> list[Example]:
    """Examples of ``objective`` from the text files: ``autoencode`` reproduces a segment from its
    nuggets; ``continue`` predicts the next ``target_size`` tokens after a segment."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    examples: list[Example] = []
    for path in text_files(paths):
        ids = tokenizer(read_text_file(path), add_special_tokens=False, verbose=False).input_ids
        segments = sentence_segments(ids, tokenizer, segment_size)
        if objective == "autoencode":
            examples.extend(Example(tuple(s), opener, tuple(s)) for s in segments)
        else:
            for past, future in zip(segments, segments[1:]):
                examples.append(Example(tuple(past[:-1]), past[-1], tuple(future[:target_size])))
    if not examples:
        raise ValueError(
            f"the training data gives no {objective} examples: the texts are shorter than one segment "
            f"({segment_size} tokens); add text or lower --segment-size"
        )
    return examples


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, then the last ``fraction`` (at least one) held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, int(len(examples) * fraction)) if len(examples) > 1 else 0
    train = [examples[i] for i in order[: len(order) - held]]
    return train, [examples[i] for i in order[len(order) - held :]]


def batch_at(
    examples: list[Example], step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list[Example]:
    """The examples of global ``step`` for ``rank``: a fixed function of (seed, step), so a resumed
    run reads exactly what an uninterrupted one would."""
    per_step = batch_size * world
    out = []
    for slot in range(rank * batch_size, (rank + 1) * batch_size):
        flat = step * per_step + slot
        epoch, within = divmod(flat, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(examples[int(order[within])])
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: context ids/mask, decoder input ids/mask, labels (-100 on padding and
    on the opener)."""
    width_c = max(len(e.context) for e in examples)
    width_d = max(len(e.target) for e in examples) + 1
    context = torch.full((len(examples), width_c), pad_id)
    context_mask = torch.zeros_like(context)
    inputs = torch.full((len(examples), width_d), pad_id)
    input_mask = torch.zeros_like(inputs)
    labels = torch.full_like(inputs, -100)
    for row, example in enumerate(examples):
        context[row, : len(example.context)] = torch.tensor(example.context)
        context_mask[row, : len(example.context)] = 1
        decoder = [example.opener, *example.target]
        inputs[row, : len(decoder)] = torch.tensor(decoder)
        input_mask[row, : len(decoder)] = 1
        labels[row, 1 : len(decoder)] = torch.tensor(example.target)
    return {
        "context": context,
        "context_mask": context_mask,
        "input_ids": inputs,
        "input_mask": input_mask,
        "labels": labels,
    }
