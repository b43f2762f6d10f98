"""What both benchmarks share: methods and their cache shapes, input texts, machine details, the
untrained-adapter notice, and writing results (docs/design.md).

A method is a cache policy of :class:`~nugget2d.runtime.session.StreamingSession` (``full`` is a
session whose budget never binds). Every compressing method at ratio ``r`` over a context of
``c`` tokens gets the same budget: ``ceil(r·c)`` entries for the history (4 sinks, a raw window of a
quarter of it — ``recent_share`` — the rest kept entries) plus room for the prompt and the tokens generated or scored.
Text is read in segments of the largest power of two (at most 256) that fits the room kept for the
prompt — reading and asking never need it at once — or a quarter of the history when that is more,
compressed as it streams (``reading="stream"``: memory bounded by the budget) or only once the whole
context is read with full attention (``"whole"``: how KV presses and the Nugget2D paper read).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nugget2d.compress.policies import check_policy

from .bench_peers import check_peers, is_peer
from .bench_plots import plot_quality, plot_speed
from .cache_config import CacheConfig
from .texts import bundled_text, read_text_file

SINKS = 4
FULL_SEGMENT = 256
#: How compressing methods read a context (:attr:`CacheShape.reading`).
READINGS = ("stream", "whole")
UNTRAINED = "untrained (zero-initialised LoRA, random scorer): nugget2d selects like an untrained eviction policy"


def parse_list(text: str, kind: type, name: str) -> list:
    """Comma-separated values of ``kind``; ``ValueError`` naming ``name`` for bad or empty input."""
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise ValueError(f"--{name} is empty")
    try:
        return [kind(item) for item in items]
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated {kind.__name__} values, got {text!r}") from err


def check_methods(methods: list[str], peers: bool = False) -> list[str]:
    """The methods, validated: ``ValueError`` for an unknown one. ``kvpress:<Press>`` methods only where
    ``peers`` (``bench quality``), and only with kvpress installed (checked here, before any model loads)."""
    for method in methods:
        if is_peer(method) and not peers:
            raise ValueError(f"{method}: kvpress presses are measured by `nugget2d bench quality` only")
        if not is_peer(method):
            try:
                check_policy(method)
            except ValueError as err:
                raise ValueError(f"unknown method {method!r}: {err}") from None
    check_peers(methods)
    return methods


def check_ratios(ratios: list[float]) -> list[float]:
    """The ratios, validated: each in (0, 1)."""
    for ratio in ratios:
        if not 0 < ratio < 1:
            raise ValueError(f"every ratio must be in (0, 1), got {ratio}")
    return ratios


def check_contexts(contexts: list[int], minimum: int = 1) -> list[int]:
    """The context lengths, validated: each at least ``minimum`` tokens."""
    for context in contexts:
        if context < minimum:
            raise ValueError(f"every context must be at least {minimum} tokens, got {context}")
    return contexts


def configurations(methods: list[str], ratios: list[float], contexts: list[int]) -> list[tuple[str, float, int]]:
    """``(method, ratio, context)`` to measure: ``full`` once per context (ratio 1.0), the others at every ratio."""
    configs = []
    for context in contexts:
        for method in methods:
            for ratio in [1.0] if method == "full" else ratios:
                configs.append((method, ratio, context))
    return configs


@dataclass(frozen=True)
class CacheShape:
    """A session's cache for one configuration: ``history`` entries for the text read, plus ``reserve``."""

    method: str
    ratio: float
    context: int
    reserve: int
    recent_share: float = 0.25  # of the history, kept raw (the rest after 4 sinks: kept entries)
    positions: str = "auto"  # how compressing methods number their cache (CacheConfig.positions)
    reading: str = "stream"  # "whole": the context is read with full attention, then compressed (as presses do)
    observation_window: int = CacheConfig.observation_window  # per-head caches: recent queries whose attention votes
    surprise_votes: bool = False  # per-head caches: surprise votes beside score and attention (CacheConfig)
    scorer_first_share: float | None = None  # per-head caches: cap on the entries chosen by score first (CacheConfig)

    @property
    def history(self) -> int:
        """Entries left for the text once the prompt and answer are in: ``ceil(r·c)`` (``full``: all of it)."""
        if self.method == "full":
            return self.context
        return math.ceil(self.ratio * self.context - 1e-9)

    @property
    def everything(self) -> int:
        """Entries that hold all a session reads: the context, ``reserve`` and 64 of slack for start tokens."""
        return self.context + self.reserve + 64

    def settings(self) -> CacheConfig:
        """The :class:`CacheConfig` of this configuration; ``ValueError`` if ``ratio·context`` is too small."""
        if self.method == "full":
            recent = self.everything  # nothing ever leaves
            return CacheConfig(
                ratio=1.0,
                budget=SINKS + recent + FULL_SEGMENT + 1,
                recent=recent,
                segment=FULL_SEGMENT,
                sinks=SINKS,
                policy="full",  # the unmodified model's K/V, none ever dropped
            )
        history = self.history
        quarter = history // 4
        recent = int(history * self.recent_share)
        if quarter < 1 or recent < 1 or history <= SINKS + recent + quarter:
            raise ValueError(
                f"ratio {self.ratio} of {self.context} tokens leaves {history} cache entries, too few for "
                f"{SINKS} sinks, a raw window of {self.recent_share:.0%} and kept entries; use a longer context, "
                "a larger ratio or a smaller --recent-share"
            )
        return CacheConfig(
            ratio=self.ratio,
            budget=history + self.reserve,
            recent=recent,
            segment=1 << (min(FULL_SEGMENT, max(quarter, self.reserve)).bit_length() - 1),  # whole segments
            sinks=SINKS,
            policy=self.method,
            positions=self.positions,
            read_budget=self.everything if self.reading == "whole" else None,
            observation_window=self.observation_window,
            surprise_votes=self.surprise_votes,
            scorer_first_share=self.scorer_first_share,
        )


def load_token_texts(tokenizer, inputs: list[str] | None) -> tuple[list[list[int]], list[str]]:
    """Token ids of each input file (or of the bundled book when none), and their names.
    ``ValueError`` for a missing, empty or binary file."""
    if inputs:
        texts, names = [], []
        for name in inputs:
            if not Path(name).is_file():
                raise ValueError(f"input file {name} does not exist")
            texts.append(read_text_file(name))
            names.append(str(name))
    else:
        texts, names = [bundled_text()], ["bundled: The Compleat Angler (Walton, 1653)"]
    ids = [tokenizer(text, add_special_tokens=False, verbose=False).input_ids for text in texts]
    return ids, names


def machine_info(model, adapter: str | None) -> dict:
    """Where and with what the numbers were measured."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_bytes(),
        "device": str(model.device),
        "model": model.config.base_model,
        "dtype": str(model.base.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "attention": model.attention,
        "adapter": UNTRAINED if _untrained(adapter) else adapter,
        "untrained_adapter": _untrained(adapter),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _untrained(adapter: str | None) -> bool:
    return adapter in (None, "", "none", "untrained")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def announce_adapter(adapter: str | None, out=None) -> None:
    """Say on ``out`` (standard error) which adapter is measured, loudly when it is untrained."""
    out = out or sys.stderr
    if _untrained(adapter):
        print(f"nugget2d bench: adapter is {UNTRAINED}", file=out)
    else:
        print(f"nugget2d bench: adapter {adapter}", file=out)


def write_results(
    out_dir: str | Path, name: str, machine: dict, records: list[dict], extra: dict | None = None
) -> Path:
    """Write ``out_dir/name.json`` as ``{"machine": ..., "records": [...]}`` (plus ``extra`` keys)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine, **(extra or {}), "records": records}, indent=2) + "\n")
    return path


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def record_key(record: dict) -> tuple:
    """What a record measured, as a key: method, ratio, context, threads and look-back variant."""
    names = ("method", "ratio", "context", "threads", "lookback", "lookback_selector")
    return tuple(record.get(name) for name in names)


def run_options(data: dict) -> dict:
    """The options of a loaded ``quality.json``/``speed.json``: its own, or, for a file :func:`merge_results`
    wrote, its first run's (the records the merge kept from the earlier runs were measured with those)."""
    return data["options"] if "options" in data else data["runs"][0]["options"]


def merge_results(paths: list[str | Path], out_dir: str | Path) -> Path:
    """Join the records of several ``speed.json`` (or several ``quality.json``) files of one kind into
    ``out_dir`` (machine details of each run kept under ``runs``), and plot them; return the JSON path.
    A record of a later path replaces an earlier one of the same configuration (:func:`record_key`), in
    its place: re-measuring one method of a run is merging the new run after the old one."""
    loaded = []
    for path in map(Path, paths):
        path = (
            path / "speed.json" if (path / "speed.json").is_file() else path / "quality.json" if path.is_dir() else path
        )
        if not path.is_file():
            raise ValueError(f"no benchmark results at {path}")
        loaded.append((path, json.loads(path.read_text())))
    kinds = {path.stem for path, _ in loaded}
    if len(kinds) != 1 or not kinds <= {"speed", "quality"}:
        raise ValueError(f"merge needs results of one kind (all speed.json or all quality.json), got {sorted(kinds)}")
    kind = kinds.pop()
    by_key = {record_key(record): record for _, data in loaded for record in data["records"]}  # later wins
    records = list(by_key.values())
    runs = []
    for path, data in loaded:  # a file merged before brings its own runs, so the list stays flat
        runs += (
            data["runs"]
            if "runs" in data
            else [{"source": str(path), **{k: v for k, v in data.items() if k != "records"}}]
        )
    out = write_results(out_dir, kind, loaded[0][1]["machine"], records, {"benchmark": kind, "runs": runs})
    (plot_speed if kind == "speed" else plot_quality)(records, Path(out_dir) / f"{kind}.png", title="merged runs")
    return out
