"""Training data: plain text into sentence-snapped token segments and JSONL rows into (what to
compress, what to read, what to learn) examples per objective; a deterministic order by seed, a
held-out split, and weighted mixes of objectives."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .facts import Fact, plant_located_facts
from .importance import REPEAT_INSTRUCTION
from .texts import data_files, read_text_file
from .train_exclude import ExcludedText

TEXT_OBJECTIVES = ("autoencode", "continue", "recall", "facts", "scorer")
JSONL_OBJECTIVES = {"qa": ("context", "question", "answer"), "summarize": ("document", "summary")}
OBJECTIVES = (*TEXT_OBJECTIVES, *JSONL_OBJECTIVES, "mix")
_SENTENCE_END = (".", "!", "?", "\n", '."', '?"', '!"')
MAX_DOCUMENT_TOKENS = 2048  # longer JSONL documents are cut here (one compression pass per example)


@dataclass(frozen=True)
class Shape:
    """How examples are cut from text: ``segment`` tokens compressed per example, ``target`` tokens
    learned; with ``recent`` > 0 the hybrid cache of docs/design.md — ``sinks`` first tokens and the last
    ``recent`` tokens before the target stay raw beside the nuggets; ``distractors``: segments
    compressed after the passage of ``recall`` and ``facts`` examples, before it is asked for."""

    segment: int = 128
    target: int = 64
    recent: int = 0
    sinks: int = 0
    distractors: int = 1

    def __post_init__(self) -> None:
        if self.segment < 2 or self.target < 1 or self.recent < 0 or self.sinks < 0:
            raise ValueError(f"bad example shape {self}: segment >= 2, target >= 1, recent and sinks >= 0")
        if self.distractors < 1:
            raise ValueError(
                f"--distractors must be >= 1 (segments between a passage and its recall), got {self.distractors}"
            )
        if self.sinks >= self.segment // 2:
            raise ValueError(f"sinks ({self.sinks}) must be under half the segment ({self.segment})")


@dataclass(frozen=True)
class Example:
    """Encode ``sinks`` (kept raw), compress ``context`` to nuggets, encode ``recent`` (kept raw);
    then the decoder reads ``prompt + target`` over that cache and learns ``target``."""

    context: tuple[int, ...]
    prompt: tuple[int, ...]
    target: tuple[int, ...]
    sinks: tuple[int, ...] = field(default=())
    recent: tuple[int, ...] = field(default=())
    objective: str = ""


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The ``.txt`` files named or found under directories; ``ValueError`` for a missing path."""
    return data_files(paths, (".txt",))


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
    paths: Iterable[str | Path],
    tokenizer,
    objective: str,
    shape: Shape,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    plant_facts: int = 0,
    exclude: ExcludedText | None = None,
) -> list[Example]:
    """Examples of ``objective`` from the data: text files for ``autoencode`` (reproduce a segment
    from its nuggets), ``continue`` (the tokens after a segment), ``recall`` (a passage again,
    after a distractor segment), ``facts`` (a question about a fact planted in a segment, answered
    after a distractor segment; needs ``plant_facts``) and ``scorer`` (a segment, the repeat
    instruction, the segment again: KVzip's importance pass); JSONL rows for ``qa`` and
    ``summarize``; ``mix`` draws from several by weight. ``plant_facts``: synthetic rare facts planted
    in every text segment (seeded, :mod:`.facts`). ``exclude``: text never read (a segment or document
    sharing a run of tokens with it is left out, and no example spans the gap). ``ValueError`` when
    the data gives none."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    paths = list(paths)
    if objective == "mix":
        return mix_examples(paths, tokenizer, mix or {}, shape, seed, plant_facts, exclude)
    check_planted_facts([objective], plant_facts)
    if objective in JSONL_OBJECTIVES:
        examples = jsonl_examples(_jsonl_files(paths), tokenizer, objective, exclude)
    else:
        opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        repeat = tuple(tokenizer(REPEAT_INSTRUCTION, add_special_tokens=False, verbose=False).input_ids)
        examples, rng = [], random.Random(seed)
        turn = _chat_turn(tokenizer) if objective == "facts" else None
        for path in _text_files(paths):
            ids = tokenizer(read_text_file(path), add_special_tokens=False, verbose=False).input_ids
            segments = sentence_segments(ids, tokenizer, shape.segment)
            planted = [plant_located_facts(tokenizer, s, plant_facts, rng) for s in segments]
            for run in _kept_runs(planted, segments, exclude):
                if turn is not None:
                    examples.extend(fact_examples(run, shape, turn))
                else:
                    examples.extend(text_examples([s for s, _ in run], objective, shape, opener, repeat))
    if not examples:
        recalled = f"{shape.distractors + 2} segments"
        needed = {"recall": recalled, "facts": recalled, "continue": "two segments"}.get(objective, "one segment")
        excluded = f" once --exclude left out the text it shares with {list(exclude.paths)}" if exclude else ""
        raise ValueError(
            f"the training data gives no {objective} examples{excluded}: the texts are shorter than the "
            f"{needed} of {shape.segment} tokens an example needs; add "
            "text or lower --segment-size"
            if objective in TEXT_OBJECTIVES
            else f"the training data gives no {objective} examples{excluded} (no rows)"
        )
    return examples


def _kept_runs(planted: list, segments: list[list[int]], exclude: ExcludedText | None) -> list[list]:
    """``planted`` cut into runs of consecutive segments none of which (as read, before planting)
    overlaps the excluded text: examples are built within a run, so none reads across a gap."""
    if exclude is None:
        return [planted]
    runs: list[list] = [[]]
    for item, segment in zip(planted, segments):
        if exclude.overlaps(segment):
            runs.append([])
        else:
            runs[-1].append(item)
    return [run for run in runs if run]


def check_planted_facts(objectives: Iterable[str], plant_facts: int) -> None:
    """``ValueError`` when ``objectives`` include ``facts`` but no facts are planted (nothing to ask about)."""
    if "facts" in objectives and plant_facts < 1:
        raise ValueError("the facts objective asks about planted facts: give --plant-facts 1 (or more)")


def text_examples(
    segments: list[list[int]], objective: str, shape: Shape, opener: int, repeat: tuple[int, ...] = ()
) -> list[Example]:
    """Examples of a text objective from consecutive segments of one text (``repeat``: the
    instruction of ``scorer`` examples)."""
    out: list[Example] = []
    if objective == "autoencode":  # the whole segment again, read over the cache a session would hold of it
        edge = shape.sinks + shape.recent
        return [
            Example(
                tuple(s[shape.sinks : len(s) - shape.recent]),
                (opener,),
                tuple(s),
                tuple(s[: shape.sinks]),
                tuple(s[len(s) - shape.recent :]),
                objective,
            )
            for s in segments
            if len(s) > edge
        ]
    if objective == "scorer":
        return [Example(tuple(s), repeat, tuple(s), objective=objective) for s in segments]
    span = 2 if objective == "continue" else shape.distractors + 2
    for i in range(len(segments) - span + 1):
        first, following = segments[i], segments[i + span - 1]
        if objective == "continue":
            sinks, far, target = first[: shape.sinks], first[shape.sinks :], None
        else:  # recall: the passage, its distractor segments, then the passage again
            sinks, far = first[: shape.sinks], _compressed(first, segments[i + 1 : i + span - 1], shape)
            target = first[shape.sinks : shape.sinks + shape.target]
        if shape.recent:
            if len(following) < shape.recent + (shape.target if target is None else 1):
                continue
            recent, prompt = following[: shape.recent - 1], (following[shape.recent - 1],)
            target = target or following[shape.recent : shape.recent + shape.target]
        else:
            recent, prompt = [], (far[-1],)
            far = far[:-1]
            target = target or following[: shape.target]
        out.append(Example(tuple(far), prompt, tuple(target), tuple(sinks), tuple(recent), objective))
    return out


def fact_examples(
    planted: list[tuple[list[int], list[tuple[Fact, int]]]],
    shape: Shape,
    turn: Callable[[str, str], tuple[tuple[int, ...], tuple[int, ...]]],
) -> list[Example]:
    """``facts`` examples from consecutive planted segments of one text (:func:`~.facts.plant_located_facts`):
    a segment and its ``shape.distractors`` following ones are compressed as ``recall`` compresses a
    passage and its distractors, the next segment's first ``recent`` tokens stay raw, and for every fact
    planted in the compressed segments (past the sinks) the question is asked and answered:
    ``turn(question, answer) -> (prompt, target)``."""
    out: list[Example] = []
    span = shape.distractors + 2
    for i in range(len(planted) - span + 1):
        (first, first_facts), *compressed, (following, _) = planted[i : i + span]
        if len(following) < shape.recent:
            continue
        sinks, recent = first[: shape.sinks], following[: shape.recent]
        far = _compressed(first, [segment for segment, _ in compressed], shape)
        asked = [fact for fact, start in first_facts if start >= shape.sinks]
        asked += [fact for _, facts in compressed for fact, _ in facts]
        for fact in asked:
            prompt, target = turn(fact.question, fact.answer)
            out.append(Example(tuple(far), prompt, target, tuple(sinks), tuple(recent), "facts"))
    return out


def _compressed(first: list[int], distractors: list[list[int]], shape: Shape) -> list[int]:
    """What a ``recall`` or ``facts`` example compresses: the passage past its sinks, then its distractors."""
    return first[shape.sinks :] + [t for segment in distractors for t in segment]


def _chat_turn(tokenizer) -> Callable[[str, str], tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(question, answer) -> (prompt, target)``: the question in the model's chat format after a
    document (as ``nugget2d qa`` asks it), then the answer and the end of the turn."""
    from .chat import ChatFormat

    chat = ChatFormat.from_tokenizer(tokenizer)
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()

    def turn(question: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        prompt = tokenizer(chat.question(question, True), add_special_tokens=False, verbose=False).input_ids
        target = tokenizer(answer, add_special_tokens=False, verbose=False).input_ids
        return tuple(prompt), (tuple(target) + eos if target else ())

    return turn


def jsonl_examples(files: list[Path], tokenizer, objective: str, exclude: ExcludedText | None = None) -> list[Example]:
    """QA rows ``{context, question, answer}`` or summary rows ``{document, summary}``, read with
    ``datasets``: the document is compressed; the question (or a request for a summary) is asked in
    the model's chat format and the answer is learned. Rows whose document overlaps ``exclude`` are
    left out."""
    import datasets

    fields = JSONL_OBJECTIVES[objective]
    try:
        rows = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception as err:  # datasets wraps parse errors in several exception types
        raise ValueError(f"could not read {objective} rows from {[str(f) for f in files]}: {err}") from err
    missing = [name for name in fields if name not in rows.column_names]
    if missing:
        raise ValueError(
            f"{objective} rows need the fields {list(fields)}; {[str(f) for f in files]} lack {missing} "
            f"(found {rows.column_names})"
        )
    turn = _chat_turn(tokenizer)
    out = []
    for row in rows:
        document = row[fields[0]]
        question = row["question"] if objective == "qa" else "Summarize the document."
        answer = row[fields[-1]]
        if not (isinstance(document, str) and isinstance(question, str) and isinstance(answer, str)):
            continue
        context = tokenizer(document, add_special_tokens=False, verbose=False).input_ids[:MAX_DOCUMENT_TOKENS]
        if exclude is not None and exclude.overlaps(context):
            continue
        prompt, target = turn(question, answer)
        if context and prompt and target:
            out.append(Example(tuple(context), prompt, target, objective=objective))
    return out


def mix_examples(
    paths: list[str | Path],
    tokenizer,
    weights: dict[str, float],
    shape: Shape,
    seed: int,
    plant_facts: int = 0,
    exclude: ExcludedText | None = None,
) -> list[Example]:
    """A seeded draw from several objectives' examples in proportion to ``weights`` (as many in all
    as the objectives give together); each objective reads the files that suit it (text or JSONL)."""
    if not weights:
        raise ValueError("--objective mix needs --mix NAME=WEIGHT,... (e.g. continue=0.7,recall=0.3)")
    for name, weight in weights.items():
        if name == "scorer":
            raise ValueError("--mix cannot include scorer: it trains the scorer alone, with its own ranking loss")
        if name not in OBJECTIVES or name == "mix":
            mixable = [o for o in OBJECTIVES if o not in ("mix", "scorer")]
            raise ValueError(f"--mix: unknown objective {name!r}; choose from {mixable}")
        if not weight > 0:
            raise ValueError(f"--mix: the weight of {name} must be > 0, got {weight}")
    parts = {
        name: build_examples(paths, tokenizer, name, shape, plant_facts=plant_facts, exclude=exclude)
        for name in weights
    }
    total, scale = sum(map(len, parts.values())), sum(weights.values())
    rng = random.Random(seed)
    out: list[Example] = []
    for name, examples in parts.items():
        wanted = max(1, round(total * weights[name] / scale))
        out.extend(rng.sample(examples, wanted) if wanted <= len(examples) else rng.choices(examples, k=wanted))
    return out


def parse_mix(text: str | None) -> dict[str, float]:
    """``"continue=0.7,recall=0.3"`` → ``{"continue": 0.7, "recall": 0.3}``; ``ValueError`` if malformed."""
    if not text:
        return {}
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not NAME=WEIGHT (e.g. continue=0.7,recall=0.3)") from None
    return weights


def _is_jsonl(path: Path) -> bool:
    return path.suffix in (".jsonl", ".json")


def _text_files(paths: list[str | Path]) -> list[Path]:
    files = [p for p in text_files(paths) if not _is_jsonl(p)]
    if not files:
        raise ValueError(f"no text files in {[str(p) for p in paths]} (text objectives read .txt files)")
    return files


def _jsonl_files(paths: list[str | Path]) -> list[Path]:
    files = [p for p in data_files(paths, (".jsonl", ".json")) if _is_jsonl(p)]
    if not files:
        raise ValueError(f"no .jsonl files in {[str(p) for p in paths]} (qa and summarize read JSONL rows)")
    return files


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
    """Right-padded tensors: the compressed context, the raw sinks and recent tokens (when any
    example has them), the decoder's ``prompt + target`` and its labels (-100 except on targets).
    With a ``facts`` example among them, ``label_weights`` too: each example's target weighs the same
    in the loss, so a short answer counts as much as a continuation's ``--target-size`` tokens."""
    batch: dict[str, torch.Tensor] = {}
    for name in ("sinks", "context", "recent"):
        if name == "context" or any(getattr(e, name) for e in examples):
            batch[name], batch[name + "_mask"] = _padded([getattr(e, name) for e in examples], pad_id)
    decoder = [e.prompt + e.target for e in examples]
    batch["input_ids"], batch["input_mask"] = _padded(decoder, pad_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, example in enumerate(examples):
        labels[row, len(example.prompt) : len(decoder[row])] = torch.tensor(example.target)
    batch["labels"] = labels
    if any(example.objective == "facts" for example in examples):
        weights = torch.zeros(labels.shape)
        for row, example in enumerate(examples):
            weights[row, len(example.prompt) : len(decoder[row])] = 1.0 / len(example.target)
        batch["label_weights"] = weights
    return batch


def _padded(rows: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask
