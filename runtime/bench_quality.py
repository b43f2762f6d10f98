"""``nugget2d bench quality``: what each method keeps, at the same cache budget (docs/design.md).

* ``ppl`` — continuation perplexity: read ``context`` tokens of a text, then score the next
  ``continuation`` (256) tokens teacher-forced over the cache.
* ``recall_ppl`` — far recall (issue 11): the same windows; the text's first ``passage`` tokens
  (after a short lead) sit at the far end of the context and the rest is distractor text; score the
  passage's first ``repeat`` (128) tokens again right after the context.
* ``bleu`` — autoencoding: read ``ae_tokens`` tokens, then decode as many greedily after an opener
  token; sacrebleu corpus BLEU (0–1) against the text.
* ``qa_accuracy`` — a fact ("The secret code of the blue door is 4821.") planted at controlled
  depths of a ``context``-token text; the question goes through the chat template after the text;
  correct when the answer contains the code. (docs/design.md: the default 135M model cannot answer this
  at length even with full KV.)
* ``ruler`` — RULER tasks as lm-eval generates and scores them (:mod:`~nugget2d.runtime.bench_ruler`),
  at each context length; the question is read after the context is compressed. The cache is sized
  for RULER's length, as a server's flags are (a prompt is a little shorter: ``ruler_context_tokens``).
  Not in the default metrics: it needs the ``eval`` extra.

All sessions go through :class:`StreamingSession` (reading, :meth:`~StreamingSession.score_ids`
and :meth:`~StreamingSession.ask`); configurations are interleaved within each metric.
``kvpress:<Press>`` methods (:mod:`~nugget2d.runtime.bench_peers`) are scored on the same ``ppl``
and ``recall_ppl`` windows and answer the same RULER prompts.
Longer than ~400 lines because every metric's jobs run interleaved in one loop (so methods see the
same windows in one process); RULER, look-back and kvpress parts live in their own modules.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from . import bench_lookback, bench_peers, bench_ruler
from .bench_common import (
    READINGS,
    CacheShape,
    announce_adapter,
    check_contexts,
    check_methods,
    check_ratios,
    configurations,
    load_token_texts,
    machine_info,
    write_results,
)
from .bench_plots import plot_quality
from .bench_recall import RECALL_LEAD, recall_passage
from .cache_config import CacheConfig
from .chat import ChatFormat
from .facts import plant
from .generation import GenerationSettings
from .lookback import DEFAULT_CUTOFF, DEFAULT_SELECTOR, DEFAULT_SPAN, LookBack
from .session import POSITIONS, StreamingSession, start_ids

METRICS = ("ppl", "recall_ppl", "bleu", "qa", "ruler")
DEFAULT_METRICS = ("ppl", "recall_ppl", "bleu", "qa")
COLORS = ("blue", "red", "green", "yellow", "black", "white", "silver", "golden")
QA_NEW_TOKENS = 16


@dataclass
class QualityOptions:
    """What ``bench quality`` measures; validated on construction."""

    methods: list[str]
    ratios: list[float]
    contexts: list[int]
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    samples: int = 4
    continuation: int = 256
    passage: int = 256
    repeat: int = 128
    ae_tokens: int = 128
    ae_samples: int = 8
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    qa_samples: int = 2
    ruler_tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    ruler_samples: int = 4  # the first samples lm-eval generates for each task and length
    ruler_new_tokens: int = 32
    ruler_raw_tail: int | None = None  # prompt tokens read raw, as `serve --compress-threshold`; None: the question
    seed: int = 0
    inputs: list[str] = field(default_factory=list)
    recent_share: float = 0.25  # of each compressing method's history kept raw (the budget split)
    positions: str = "auto"  # how compressing methods number their cache (CacheConfig.positions)
    reading: str = "stream"  # compress while streaming, or after reading the whole context (CacheShape.reading)
    observation_window: int = CacheConfig.observation_window  # per-head caches: the last queries' attention votes
    surprise_votes: bool = False  # per-head caches: each token's surprise votes too (CacheConfig.surprise_votes)
    scorer_first_share: float | None = None  # per-head caches: CacheConfig.scorer_first_share
    lookback: list[int] = field(default_factory=lambda: [0])  # qa, ruler: tokens read back per answer (0 = off)
    lookback_selectors: list[str] = field(default_factory=lambda: [DEFAULT_SELECTOR])
    lookback_placement: str = "auto"  # where look-back spans are read (CacheConfig.lookback_placement)
    lookback_span: int = DEFAULT_SPAN
    lookback_cutoff: float = DEFAULT_CUTOFF

    def __post_init__(self) -> None:
        check_methods(self.methods, peers=True)
        if self.observation_window < 0:
            raise ValueError(f"observation_window must be >= 0, got {self.observation_window}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {list(READINGS)}, got {self.reading!r}")
        if not 0 < self.recent_share < 1:
            raise ValueError(f"recent_share must be in (0, 1), got {self.recent_share}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {self.positions!r}")
        check_ratios(self.ratios)
        bench_lookback.check_lookback_options(
            self.lookback, self.lookback_selectors, self.lookback_span, self.lookback_placement, self.lookback_cutoff
        )
        for metric in self.metrics:
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
        for name in (
            "samples",
            "continuation",
            "repeat",
            "ae_tokens",
            "ae_samples",
            "qa_samples",
            "ruler_samples",
            "ruler_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.repeat > self.passage:
            raise ValueError(f"the repeat ({self.repeat}) cannot be longer than the passage ({self.passage})")
        check_contexts(self.contexts, minimum=RECALL_LEAD + self.passage + 1 if "recall_ppl" in self.metrics else 2)
        for depth in self.depths:
            if not 0 <= depth <= 1:
                raise ValueError(f"every depth must be in [0, 1], got {depth}")
        if "ruler" in self.metrics:
            bench_ruler.check_tasks(self.ruler_tasks)
        if self.ruler_raw_tail is not None and self.ruler_raw_tail < 1:
            raise ValueError(f"ruler_raw_tail must be >= 1 (or unset: the question line), got {self.ruler_raw_tail}")

    def look_back(self) -> LookBack:
        """The placement, span and cutoff every look-back variant of the run reads with (look-back off)."""
        return LookBack(0, span=self.lookback_span, placement=self.lookback_placement, cutoff=self.lookback_cutoff)

    @property
    def window_reserve(self) -> int:
        """Entries kept beside the history for a text window's scorings: the longer one (continuation or
        repeat) and its opener; both metrics free this room, so they read the text from the same entries."""
        return max(self.continuation, self.repeat) + 1

    def shape(self, config: tuple, reserve: int) -> CacheShape:
        """The cache of configuration ``(method, ratio, context)`` with ``reserve`` entries for what is
        scored or generated, under these options' budget split and positions."""
        return CacheShape(
            *config, reserve, self.recent_share, self.positions, self.reading, self.observation_window,
            self.surprise_votes, self.scorer_first_share,
        )  # fmt: skip


def windows(texts: list[list[int]], length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over the texts (a window never crosses
    two texts); ``ValueError`` when no text is long enough."""
    usable = [ids for ids in texts if len(ids) >= length]
    if not usable:
        longest = max((len(ids) for ids in texts), default=0)
        raise ValueError(
            f"no input text has {length} tokens (the longest has {longest}); give longer --input files or "
            "shorter --contexts"
        )
    slots = math.ceil(count / len(usable))
    out = []
    for i in range(count):
        ids = usable[i % len(usable)]
        start = int((len(ids) - length) * (i // len(usable) + 0.5) / slots)
        out.append(ids[start : start + length])
    return out


def held_for(session: StreamingSession, needed: int) -> tuple[int, int]:
    """Cache entries (and their bytes) holding the text when ``needed`` more tokens are read: the
    session makes room down to ``budget - needed`` entries first."""
    entries = int(session.cache.entry_counts()[0])
    held = min(entries, session.settings.budget - needed)
    return held, round(session.cache.nbytes * held / entries)


def perplexities(model, tokenizer, shape: CacheShape, window: list[int], options: QualityOptions) -> dict:
    """Continuation and far-recall negative log-likelihood sums (and counts) of one window of
    ``context + continuation`` tokens, reading the context once (the session is forked)."""
    context = shape.context
    session = StreamingSession(model, tokenizer, shape.settings(), chat=False)
    session.ingest_ids(window[: context - 1], final=True)
    result = {}
    room = shape.reserve  # both metrics read the text from the same number of entries: the history
    result["held"] = held_for(session, room)
    if "ppl" in options.metrics:
        scored = window[context - 1 : context + options.continuation]
        nll = -session.fork().score_ids(scored, room=room)
        result["ppl"] = (float(nll.sum()), int(nll.numel()))
    if "recall_ppl" in options.metrics:
        repeat = recall_passage(window, options.repeat)
        nll = -session.score_ids([window[context - 1], *repeat], room=room)
        result["recall_ppl"] = (float(nll.sum()), int(nll.numel()))
    return result


def autoencode(model, tokenizer, shape: CacheShape, text: list[int]) -> tuple[str, tuple[int, int]]:
    """Greedy reconstruction of ``text`` from a session that read it, after an opener token."""
    opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    session = StreamingSession(model, tokenizer, shape.settings(), chat=False)
    session.ingest_formatted(text, final=True)  # the opener alone marks the start: no BOS or template
    held = held_for(session, len(text) + 1)
    out = list(session.ask_ids([opener], GenerationSettings(max_new_tokens=len(text))))
    return tokenizer.decode(out, skip_special_tokens=True), held


def answer(
    model, tokenizer, shape: CacheShape, ids: list[int], question: str, options: QualityOptions, code: str
) -> tuple[list[dict], tuple[int, int]]:
    """The greedy answers to ``question`` (chat template) after reading ``ids``, one per look-back variant
    of the method (:func:`~nugget2d.runtime.bench_lookback.answer_variants`)."""
    session = StreamingSession(model, tokenizer, shape.settings(), chat=True)
    session.ingest_ids(ids, final=True)
    settings = GenerationSettings(max_new_tokens=QA_NEW_TOKENS)
    prompt = session.prompt_ids(question, settings)
    held = held_for(session, len(prompt) + QA_NEW_TOKENS)
    wanted = bench_lookback.variants(shape.method, options.lookback, options.lookback_selectors)
    results = bench_lookback.answer_variants(
        session,
        lambda fork, look: fork.ask(question, settings, lookback=look),
        wanted,
        (code,),
        options.look_back(),
    )
    return results, held


def ruler_answer(
    model, tokenizer, shape: CacheShape, split: tuple[list[int], list[int]], options: QualityOptions, answers: tuple
) -> tuple[list[dict], tuple[int, int]]:
    """The greedy answers after a RULER prompt split into ``(context, tail)``, one per look-back variant:
    the context read (and compressed) first, then the tail; with the cache entries (and bytes) holding
    the context then."""
    context, tail = split
    new_tokens = options.ruler_new_tokens
    session = StreamingSession(model, tokenizer, shape.settings(), chat=False)
    session.ingest_formatted(context, final=True)  # the prompt's ids carry the tokenizer's own start
    held = held_for(session, len(tail) + new_tokens)
    settings = GenerationSettings(max_new_tokens=new_tokens)

    def ask(fork: StreamingSession, look) -> Iterator[int]:
        return fork.ask_ids(tail, settings, lookback=look)

    def render(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    wanted = bench_lookback.variants(shape.method, options.lookback, options.lookback_selectors)
    results = bench_lookback.answer_variants(session, ask, wanted, tuple(answers), options.look_back(), render)
    return results, held


def press_answer(
    runner: bench_peers.PressRunner,
    config: tuple,
    split: tuple[list[int], list[int]],
    new_tokens: int,
    record: dict,
    acc: dict,
    prefix: int | None = None,
) -> dict:
    """A press's answer after ``split`` (context, question), noted in its record's sizes and times, as one
    look-back-free answer variant (presses read nothing back)."""
    reply, sizes = runner.answer(config[0], config[1], split, new_tokens, prefix=prefix)
    bench_peers.note(record, acc, sizes)
    return {
        "variant": (0, None),
        "reply": reply,
        "seconds": sizes["answer_s"],
        "peak_bytes": sizes["peak_bytes"],
        "read_tokens": 0,
    }


def run_quality(model, tokenizer, options: QualityOptions, out_dir: str | Path, adapter: str | None = None) -> Path:
    """Measure the chosen metrics for every configuration and write ``out_dir/quality.json`` and
    ``quality.png``; return the JSON path."""
    import sacrebleu

    announce_adapter(adapter)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    texts, names = load_token_texts(tokenizer, options.inputs)
    records: dict[tuple, dict] = {}
    jobs = _jobs(tokenizer, texts, options)
    _check_window(model, jobs, options)
    sums: dict[tuple, dict[str, list]] = {}
    peers = [method for method in options.methods if bench_peers.is_peer(method)]
    scored = peers and {"ppl", "recall_ppl", "ruler", "qa"} & set(options.metrics)
    runner = bench_peers.PressRunner.for_model(model) if scored else None

    def slot(config: tuple, variant: tuple = (0, None)) -> tuple[dict, dict]:
        """The record and sums of ``config`` answering with look-back ``variant``."""
        key = (*config, *variant)
        record = records.setdefault(key, {"method": config[0], "ratio": config[1], "context": config[2]})
        return record, sums.setdefault(key, {})

    for kind, config, payload in tqdm(jobs, desc="bench quality", unit="sample", file=sys.stderr):
        shape = options.shape(config, payload["reserve"])
        record, acc = slot(config)
        if kind == "window" and bench_peers.is_peer(config[0]):
            result = runner.perplexities(*config[:2], payload["ids"], config[2], options)
            bench_peers.note(record, acc, result)
        elif kind == "window":
            result = perplexities(model, tokenizer, shape, payload["ids"], options)
            _note_size(record, shape, result["held"])
        if kind == "window":
            for metric in ("ppl", "recall_ppl"):
                if metric in result:
                    acc.setdefault(metric, [0.0, 0])
                    acc[metric][0] += result[metric][0]
                    acc[metric][1] += result[metric][1]
                    acc.setdefault(f"{metric}_by_window", []).append(math.exp(result[metric][0] / result[metric][1]))
        elif kind == "ruler":
            sample = payload["sample"]
            if bench_peers.is_peer(config[0]):
                results = [press_answer(runner, config, payload["split"], options.ruler_new_tokens, record, acc)]
            else:
                results, held = ruler_answer(model, tokenizer, shape, payload["split"], options, sample.answers)
            for result in results:
                record, acc = slot(config, result["variant"])
                if not bench_peers.is_peer(config[0]):
                    _note_size(record, shape, held)
                bench_lookback.note_answer(record, acc, result)
                score = sample.score(result["reply"])
                acc.setdefault("ruler", []).append((sample.task, score))
                acc.setdefault("ruler_context", []).append(len(payload["split"][0]))
                record.setdefault("ruler_answers", []).append(
                    {
                        "task": sample.task,
                        "index": sample.index,
                        "expected": list(sample.answers),
                        "answer": result["reply"],
                        "score": score,
                        **({"spans": result["spans"]} if result.get("spans") else {}),
                    }
                )
        elif kind == "autoencode":
            hypothesis, held = autoencode(model, tokenizer, shape, payload["ids"])
            _note_size(record, shape, held)
            acc.setdefault("bleu", []).append((hypothesis, tokenizer.decode(payload["ids"], skip_special_tokens=True)))
        else:  # qa
            if bench_peers.is_peer(config[0]):
                split = (payload["start"] + payload["ids"], payload["prompt"])
                results = [press_answer(runner, config, split, QA_NEW_TOKENS, record, acc, len(payload["start"]))]
            else:
                results, held = answer(
                    model, tokenizer, shape, payload["ids"], payload["question"], options, payload["code"]
                )
            for result in results:
                record, acc = slot(config, result["variant"])
                if not bench_peers.is_peer(config[0]):
                    _note_size(record, shape, held)
                bench_lookback.note_answer(record, acc, result)
                correct = payload["code"] in result["reply"]
                acc.setdefault("qa", []).append((payload["depth"], correct))
                record.setdefault("qa_examples", []).append(
                    {"depth": payload["depth"], "code": payload["code"], "answer": result["reply"].strip()[:120]}
                )
    for config in configurations(peers, options.ratios, options.contexts):
        record, acc = slot(config)
        bench_peers.finish(record, acc, options.metrics)
    for config, record in records.items():
        acc = sums.get(config, {})
        bench_lookback.finish(record, acc)
        for metric in ("ppl", "recall_ppl"):
            if metric in acc:
                record[metric] = math.exp(acc[metric][0] / acc[metric][1])
                record[f"{metric}_tokens"] = acc[metric][1]
                record[f"{metric}_by_window"] = acc[f"{metric}_by_window"]  # each window's own, for the spread
        if "bleu" in acc:
            hypotheses, references = zip(*acc["bleu"])
            record["bleu"] = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100
            record["bleu_samples"] = len(hypotheses)
            record["bleu_example"] = hypotheses[0][:200]
        if "ruler" in acc:
            tasks = sorted({task for task, _ in acc["ruler"]})
            record["ruler"] = {t: _mean([score for task, score in acc["ruler"] if task == t]) for t in tasks}
            record["ruler_score"] = _mean(list(record["ruler"].values()))
            record["ruler_samples"] = len(acc["ruler"])
            record["ruler_context_tokens"] = _mean(acc["ruler_context"])  # read before the tail, for RULER's length
        if "qa" in acc:
            record["qa_accuracy"] = sum(ok for _, ok in acc["qa"]) / len(acc["qa"])
            record["qa_by_depth"] = {
                str(d): sum(ok for dd, ok in acc["qa"] if dd == d) / sum(1 for dd, _ in acc["qa"] if dd == d)
                for d in sorted({d for d, _ in acc["qa"]})
            }
    extra = {
        "load_average_at_start": load_at_start,
        "benchmark": "quality",
        "inputs": names,
        "options": {k: v for k, v in vars(options).items() if k not in ("methods", "ratios", "contexts", "inputs")},
    }
    if runner is not None:
        extra["kvpress"] = bench_peers.describe(runner)
    ordered = sorted(
        (r for r in records.values() if len(r) > 3),  # a variant that answered nothing has no record
        key=lambda r: (r["context"], r["method"], r["ratio"], r.get("lookback", 0), r.get("lookback_selector", "")),
    )
    path = write_results(out_dir, "quality", machine_info(model, adapter), ordered, extra)
    state = "untrained adapter" if adapter in (None, "", "none") else f"adapter {Path(adapter).name}"
    plot_quality(ordered, Path(out_dir) / "quality.png", title=f"{Path(str(model.config.base_model)).name}, {state}")
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _check_window(model, jobs: list[tuple[str, tuple, dict]], options: QualityOptions) -> None:
    """``ValueError`` before any work when text positions would pass the model's native window."""
    window = int(model.base.config.max_position_embeddings)
    longest = max((config[2] + payload["reserve"] for _, config, payload in jobs), default=0)
    if options.positions == "original" and longest > window:
        raise ValueError(
            f"--positions original numbers the cache by text position, and a context plus what is scored takes "
            f"{longest} positions, past the model's native window ({window}); use shorter --contexts or "
            "--positions cache"
        )


def _note_size(record: dict, shape: CacheShape, held: tuple[int, int]) -> None:
    settings = shape.settings()
    record.setdefault("cache_tokens", held[0])
    record.setdefault("cache_bytes", held[1])
    record.setdefault("budget", settings.budget)
    record.setdefault("segment", settings.segment)
    record.setdefault("recent", settings.recent)


def _jobs(tokenizer, texts: list[list[int]], options: QualityOptions) -> list[tuple[str, tuple, dict]]:
    """Every sample to run, configurations interleaved (sample-major), impossible shapes refused first."""
    jobs: list[tuple[str, tuple, dict]] = []
    rng = random.Random(options.seed)
    if {"ppl", "recall_ppl"} & set(options.metrics):
        reserve = options.window_reserve
        for context in options.contexts:
            configs = configurations(options.methods, options.ratios, [context])
            for ids in windows(texts, context + options.continuation, options.samples):
                jobs.extend(("window", config, {"ids": ids, "reserve": reserve}) for config in configs)
    local = [method for method in options.methods if not bench_peers.is_peer(method)]  # presses: no bleu
    if "bleu" in options.metrics:
        configs = configurations(local, options.ratios, [options.ae_tokens])
        for ids in windows(texts, options.ae_tokens, options.ae_samples):
            jobs.extend(("autoencode", config, {"ids": ids, "reserve": len(ids) + 1}) for config in configs)
    if "ruler" in options.metrics:
        for sample in bench_ruler.samples(tokenizer, options.ruler_tasks, options.contexts, options.ruler_samples):
            context, tail = sample.split_ids(tokenizer, options.ruler_raw_tail)
            payload = {
                "sample": sample,
                "split": (context, tail),
                "reserve": len(tail) + options.ruler_new_tokens,
            }
            configs = configurations(options.methods, options.ratios, [sample.length])
            jobs.extend(("ruler", config, payload) for config in configs)
    if "qa" in options.metrics:
        chat = ChatFormat.from_tokenizer(tokenizer)
        start = start_ids(tokenizer, chat)
        for context in options.contexts:
            configs = configurations(options.methods, options.ratios, [context])
            count = len(options.depths) * options.qa_samples
            for i, window in enumerate(windows(texts, context, count)):
                depth = options.depths[i % len(options.depths)]
                color, code = rng.choice(COLORS), str(rng.randrange(1000, 10000))
                question = f"What is the secret code of the {color} door?"
                ids = plant(tokenizer, window, depth, f"The secret code of the {color} door is {code}.")
                prompt = tokenizer(chat.question(question, True), add_special_tokens=False).input_ids
                payload = {
                    "ids": ids,
                    "start": start,  # what a chat session reads before the document (a press prefills it too)
                    "prompt": prompt,
                    "question": question,
                    "code": code,
                    "depth": depth,
                    "reserve": len(prompt) + QA_NEW_TOKENS,
                }
                jobs.extend(("qa", config, payload) for config in configs)
    for _, config, payload in jobs:
        if not bench_peers.is_peer(config[0]):
            options.shape(config, payload["reserve"]).settings()
    return jobs
