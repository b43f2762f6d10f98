"""``nugget2d qa`` / ``nugget2d summarize``: batch jobs over JSONL on Ray Data (docs/design.md).

The driver locks the output (one writer per file), checks the input once (bad lines become error
rows), works out which documents the output already holds, then Ray Data reads the lines still to
do (with the driver's own line reader) and maps them over an actor pool, one model per actor. The
driver appends each finished document's rows to the output as they arrive (see
:class:`~nugget2d.runtime.batch_io.ResultFile`), so a killed job loses nothing written and a rerun
does only what is missing; at the end it checks that every document it sent got its rows.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .batch_io import ResultFile, parse_request, scan_input
from .batch_lock import OutputLock
from .batch_worker import DocumentWorker, JobSettings


@dataclass
class JobReport:
    """What one run did."""

    documents: int = 0  # documents processed in this run
    skipped: int = 0  # documents (and bad lines) already complete in the output
    rows: int = 0  # rows written in this run, error rows included
    errors: int = 0  # error rows written in this run
    retryable: int = 0  # of those, errors the next run tries again (out of memory, I/O errors)
    compressions: Counter = field(default_factory=Counter)  # times each document (by key) was streamed
    encoder_calls: dict[str, int] = field(default_factory=dict)  # encoder passes per document (by key)
    notes: list[str] = field(default_factory=list)  # things the user should know (a lock taken over)

    def summary(self, task: str, output: str | Path) -> str:
        """One line for the terminal."""
        retry = f", {self.retryable} retryable: run again to retry them" if self.retryable else ""
        return (
            f"nugget2d {task}: {self.documents} documents done, {self.skipped} already complete; "
            f"{self.rows} rows written ({self.errors} errors{retry}) to {output}"
        )


class IncompleteJobError(ValueError):
    """Documents the job sent to Ray came back with no rows; what was written stays."""

    def __init__(self, report: JobReport, missing: list[str]) -> None:
        self.report, self.missing = report, missing
        shown = ", ".join(key.removeprefix("id:") for key in missing[:50])
        more = f" and {len(missing) - 50} more" if len(missing) > 50 else ""
        super().__init__(
            f"{len(missing)} documents got no rows (was the input changed while the job ran?): ids {shown}{more}; "
            "the rows written are kept, run the same command again to do these"
        )


def run_batch_job(
    input_path: str | Path,
    output_path: str | Path,
    settings: JobSettings,
    workers: int = 2,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    progress: bool = True,
) -> JobReport:
    """Run ``settings.task`` over every request of ``input_path`` not yet complete in
    ``output_path``, on ``workers`` Ray actors (a local Ray unless ``address`` or Ray is already
    initialised). Bad lines and failing documents become error rows; bad arguments, an output
    another job is writing, or documents left without rows raise ``ValueError``."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ValueError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    input_path = Path(input_path).resolve()
    plan = scan_input(input_path, settings.task)
    output = ResultFile(output_path)
    with OutputLock(output.path) as lock:
        report = JobReport()
        if lock.note:
            print(f"nugget2d {settings.task}: {lock.note}", file=sys.stderr)
            report.notes.append(lock.note)
        done = output.prepare(plan, settings.task)
        report.skipped = len(done)
        fresh_errors = [row for row in plan.errors if f"line:{row['line']}" not in done]
        output.append(fresh_errors)
        report.rows = report.errors = len(fresh_errors)
        pending = sorted(key for key in plan.expected if key not in done)
        if pending:
            settings = replace(settings, base_dir=str(input_path.parent))
            pool = _Pool(workers, address, cpus_per_worker, gpus_per_worker, progress)
            _run_on_ray(input_path, {key: plan.lines[key] for key in pending}, output, report, settings, pool)
    return report


@dataclass
class _Pool:
    """Where the actors run and how many."""

    workers: int
    address: str | None
    cpus: float
    gpus: float
    progress: bool


def _run_on_ray(
    input_path: Path,
    pending: dict[str, tuple[int, str]],
    output: ResultFile,
    report: JobReport,
    settings: JobSettings,
    pool: _Pool,
) -> None:
    """Do the ``pending`` documents (key -> line number and digest) on Ray, appending their rows to
    ``output`` as they arrive; ``IncompleteJobError`` for any that got none."""
    if settings.model is not None:
        from .models import resolve_model_dir

        resolve_model_dir(settings.model)  # a wrong --model fails here, once, not in every actor

    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=False, **_init_arguments(pool.address, pool.workers))
    try:
        _check_resources(ray.cluster_resources(), pool.workers, pool.cpus, pool.gpus)
        dataset = _dataset(input_path, dict(pending.values()), settings, pool)
        seen: set[str] = set()
        with tqdm(
            total=len(pending), desc=settings.task, unit="doc", file=sys.stderr, disable=not pool.progress
        ) as bar:
            for result in dataset.iter_rows():
                key = str(result["key"])
                if key in seen:
                    continue  # never expected (each line is read once); written once regardless
                seen.add(key)
                rows = json.loads(result["rows"])
                output.append(rows)
                report.documents += 1
                report.rows += len(rows)
                report.errors += sum("error" in row for row in rows)
                report.retryable += sum(bool(row.get("retryable")) for row in rows)
                report.compressions[key] += int(result["compressions"])
                report.encoder_calls[key] = report.encoder_calls.get(key, 0) + int(result["encoder_calls"])
                bar.update(1)
    finally:
        if started_ray:
            ray.shutdown()
    missing = [key for key in pending if key not in seen]
    if missing:
        raise IncompleteJobError(report, missing)


def _init_arguments(address: str | None, workers: int) -> dict:
    """Join ``address`` (or ``$RAY_ADDRESS``); otherwise start a local Ray with at least one CPU
    slot per worker (the model actors are what runs)."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return {"address": address}
    return {"address": "local", "num_cpus": max(os.cpu_count() or 1, workers)}


def _check_resources(resources: dict, workers: int, cpus: float, gpus: float) -> None:
    """Refuse a pool the cluster cannot hold (Ray would wait for it forever)."""
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        have = float(resources.get(name, 0.0))
        if each and workers * each > have:
            raise ValueError(
                f"{workers} workers x {each} {name} need {workers * each:g} {name}s, but the Ray cluster has {have:g}; "
                f"lower --workers or --{name.lower()}s-per-worker"
            )


def _dataset(input_path: Path, wanted: dict[int, str], settings: JobSettings, pool: _Pool):
    """Ray Data: read the ``wanted`` lines of the JSONL on this node, map them over the actor pool."""
    import ray.data

    from .batch_source import PendingLines

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Reading takes no CPU slot: every slot is for the model actors, and a read task waiting for a
    # slot the actors hold would wait forever.
    # ``local://``: the input is read on this node, so a cluster's other nodes need no copy of it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local://", category=DeprecationWarning)
        lines = ray.data.read_datasource(PendingLines(f"local://{input_path}", wanted), num_cpus=0)
    return lines.map_batches(
        _ActorWorker,
        fn_constructor_args=(settings,),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=pool.workers),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
    )


class _ActorWorker:
    """A Ray Data actor: one model; each batch of request lines becomes one result per document."""

    def __init__(self, settings: JobSettings) -> None:
        self.worker = DocumentWorker(settings)
        self.task = settings.task

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"key": [], "rows": [], "compressions": [], "encoder_calls": []}
        for text in batch["text"]:
            request = parse_request(str(text), self.task)
            result = self.worker.run(request)
            out["key"].append(request.key)
            out["rows"].append(json.dumps(result.rows, ensure_ascii=False))
            out["compressions"].append(result.compressions)
            out["encoder_calls"].append(result.encoder_calls)
        return out
