"""What ``nugget2d train --resume`` needs, saved as safetensors + JSON and never unpickled.

A checkpoint directory holds the adapter (``adapter/``), ``trainer_state.json`` (step, tokens seen,
the run's config, data digests, scheduler and engine counters), ``optimizer.safetensors`` (each
trainable parameter's fp32 master weight and optimizer moments, by name, plus the optimizer's
scalar state) and ``rng-rank{R}.safetensors`` (torch CPU/CUDA generator states, with Python's and
NumPy's in its metadata). Writes are atomic (temp file + ``os.replace``), ``latest`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

FORMAT = "nugget2d-resume/1"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
LATEST = "latest"
SEP = "::"  # between a parameter's name and its state key in optimizer.safetensors
GROUP = "@group"  # the optimizer's per-group scalars ('@group0::step'): no parameter name starts with @

# TrainConfig fields that do not change what is trained: where it goes, how it is logged and evaluated.
# ``data`` and ``model`` are compared by content instead (file digests, the base model's fingerprint).
NOT_TRAJECTORY = frozenset(
    {
        "output",
        "resume",
        "stop_at",
        "save_every",
        "eval_every",
        "eval_examples",
        "bleu_examples",
        "allow_config_change",
        "data",
        "model",
    }
)


# --- files -------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, flushed and fsynced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line with a single ``O_APPEND`` write, so a killed process leaves whole lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(descriptor, line)
        while written < len(line):  # a regular file takes it whole; finish a short write all the same
            written += os.write(descriptor, line[written:])
    finally:
        os.close(descriptor)


def read_records(path: Path) -> list[dict]:
    """The whole JSON lines of a ``metrics.jsonl`` (a line cut short by a kill is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (later ones will be logged again by the resumed run), atomically."""
    kept = [r for r in read_records(path) if isinstance(r, dict) and r.get("step", step + 1) <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def mark_latest(output: Path, directory: Path) -> None:
    """Point ``output/latest`` at ``directory`` (atomically: a reader sees the old name or the new)."""
    atomic_write(output / LATEST, directory.name + "\n")


def latest_checkpoint(output: Path) -> Path:
    """The checkpoint directory ``output/latest`` names; ``ValueError`` if there is none or it is not one."""
    marker = output / LATEST
    if not marker.is_file():
        raise ValueError(f"--resume: no checkpoint in {output} (no 'latest' file); start without --resume")
    name = marker.read_text().strip()
    directory = output / name
    if not name.startswith("checkpoint-") or Path(name).name != name or not directory.is_dir():
        raise ValueError(f"--resume: {marker} names {name!r}, not a checkpoint directory in {output}")
    return directory


# --- the run's identity ------------------------------------------------------------------------


def data_digests(files: list[Path]) -> list[dict[str, str]]:
    """Each training data file (as read, in order) with the sha256 of its bytes."""
    digests = []
    for path in files:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests.append({"path": str(path), "sha256": sha.hexdigest()})
    return digests


def trajectory(config: dict[str, Any], data: list[dict[str, str]], world_size: int) -> dict[str, Any]:
    """What decides the run's weights step by step: the config fields that do, the data's digests
    (its contents, wherever it lies now) and the number of processes."""
    fields = {k: v for k, v in config.items() if k not in NOT_TRAJECTORY}
    fields["data"] = [d["sha256"] for d in data]
    fields["world_size"] = world_size
    return fields


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """``field: saved -> current`` for every trajectory field that differs (empty when none do); a field
    a checkpoint saved before it existed reads as its default (``defaults``)."""
    differences, defaults = [], defaults or {}
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key, defaults.get(key, "<absent>")), current.get(key, "<absent>")
        if before != after:
            if key == "data":
                before, after = _short(before), _short(after)
            differences.append(f"{key}: {before!r} -> {after!r}")
    return differences


def _short(digests: Any) -> Any:
    return [d[:12] for d in digests] if isinstance(digests, list) else digests


def refuse_unsafe(directory: Path) -> None:
    """``ValueError`` unless ``directory`` holds resume state in this format: an older checkpoint
    keeps DeepSpeed's pickled engine state, and unpickling a file runs any code it names."""
    state = directory / STATE
    try:
        saved = json.loads(state.read_text()) if state.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--resume: {state} is not valid JSON ({err}); start a new --output") from err
    if saved.get("format") == FORMAT and (directory / OPTIMIZER).is_file():
        return
    pickled = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.suffix in (".pt", ".pth", ".bin"))
    found = (
        f" Its pickled state ({', '.join(pickled[:3])}) is never loaded: unpickling a file can run any code in it."
        if pickled
        else ""
    )
    raise ValueError(
        f"--resume: {directory} is not a checkpoint this version can resume ({OPTIMIZER} and a "
        f"'{FORMAT}' {STATE} are missing; it was written by an older nugget2d or is damaged).{found} "
        f"Start a new --output, from its weights if you trust them with --init-adapter {directory / 'adapter'}"
    )


# --- optimizer state ---------------------------------------------------------------------------


def zero_optimizer(engine) -> tuple[Any, list[torch.Tensor]]:
    """The engine's ZeRO optimizer and its flat fp32 partitions (the keys of its base optimizer's state)."""
    optimizer = engine.optimizer
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1 and 2
    if partitions is None:
        partitions = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO 3
    if partitions is None or not hasattr(optimizer, "optimizer"):
        raise ValueError(
            "training checkpoints need a ZeRO optimizer: set zero_optimization.stage to 1, 2 or 3 in the "
            "DeepSpeed config (the shipped zero2.json, zero3.json and zero3_offload.json do)"
        )
    return optimizer, partitions


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The engine's trainable parameters by name, in a fixed order."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def optimizer_tensors(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars): each trainable parameter's whole fp32 weight and moments (``name::exp_avg``
    ...) and the optimizer's per-group tensor scalars (``@group0::step``); JSON-able scalars apart.
    Collective: every rank calls it, each gets the whole tensors."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer, partitions = zero_optimizer(engine)
    _link_optimizer_state(optimizer)
    state = optimizer.optimizer.state
    moment_keys = sorted({k for flat in partitions for k, v in state[flat].items() if _moment(v, flat)})
    tensors: dict[str, torch.Tensor] = {}
    for name, param in trainable(engine):
        tensors[f"{name}{SEP}fp32"] = safe_get_full_fp32_param(param).detach().float().cpu().contiguous()
        for key in moment_keys:
            value = safe_get_full_optimizer_state(param, key)
            tensors[f"{name}{SEP}{key}"] = value.detach().cpu().contiguous()
    scalars: dict[str, Any] = {}
    for index, flat in enumerate(partitions):
        for key, value in state[flat].items():
            if torch.is_tensor(value) and not _moment(value, flat):
                tensors[f"{GROUP}{index}{SEP}{key}"] = value.detach().cpu().clone().contiguous()
            elif not torch.is_tensor(value):
                scalars[f"{GROUP}{index}{SEP}{key}"] = value
    return tensors, scalars


def _link_optimizer_state(optimizer) -> None:
    """Point every parameter of a ZeRO 1/2 optimizer at its group's current optimizer state. DeepSpeed
    links them once, right after the first group's first step, so with several groups (``--scorer-lr``)
    the later groups' parameters would point at a state not yet created."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _moment(value: Any, flat: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == flat.shape


def save_optimizer(engine, directory: Path, rank: int) -> dict[str, Any]:
    """Write ``optimizer.safetensors`` (rank 0; every rank must call: it gathers) and return what
    goes to the JSON state beside it: scalars, learning rates, scheduler and engine counters."""
    tensors, scalars = optimizer_tensors(engine)
    if rank == 0:
        atomic_write(directory / OPTIMIZER, save(tensors, metadata={"format": FORMAT}))
    optimizer, _ = zero_optimizer(engine)
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    if scheduler is not None:
        scheduler.pop("lr_lambdas", None)  # functions: rebuilt from the config, not saved
    return {
        "optimizer_scalars": scalars,
        "lr": [group["lr"] for group in optimizer.optimizer.param_groups],
        "scheduler": scheduler,
        "engine": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps", "micro_steps")},
    }


def load_optimizer(engine, directory: Path, saved: dict[str, Any], reschedule: bool = False) -> None:
    """Put the weights, optimizer state, learning rates, scheduler and engine counters of
    ``directory`` back into ``engine`` (every rank, before the first step). With ``reschedule``
    (another --lr, --warmup-steps or --max-steps, allowed) the schedule continues from the saved
    step with this run's base rate and shape instead of the saved rates."""
    import deepspeed

    optimizer, partitions = zero_optimizer(engine)
    tensors = _read_safetensors(directory / OPTIMIZER)
    params = trainable(engine)
    _check_names(tensors, params, directory)
    state = optimizer.optimizer.state
    for index, flat in enumerate(partitions):
        if not state[flat]:  # the optimizer creates its state at its first step: create it as it would
            state[flat].update(_fresh_state(tensors, saved["optimizer_scalars"], index, flat, optimizer))
        for key in list(state[flat]):
            if not _moment(state[flat][key], flat):
                state[flat][key] = _scalar(tensors, saved["optimizer_scalars"], index, key, state[flat][key])
    _link_optimizer_state(optimizer)
    moment_keys = sorted({k.split(SEP, 1)[1] for k in tensors if not k.startswith(GROUP)} - {"fp32"})
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
        for name, param in params:
            param.data.copy_(tensors[f"{name}{SEP}fp32"].to(param.dtype))
    for name, param in params:
        _set_full(param, tensors[f"{name}{SEP}fp32"], None)
        for key in moment_keys:
            _set_full(param, tensors[f"{name}{SEP}{key}"], key)
    scheduler = engine.lr_scheduler
    base_lrs = list(scheduler.base_lrs) if scheduler is not None else []
    for group, lr in zip(optimizer.optimizer.param_groups, saved["lr"], strict=True):
        group["lr"] = lr
    if saved["scheduler"] is not None and scheduler is not None:
        scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": [None] * len(saved["lr"])})
        if reschedule:
            scheduler.base_lrs = base_lrs
            rates = [base * rule(scheduler.last_epoch) for base, rule in zip(base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(optimizer.optimizer.param_groups, rates, strict=True):
                group["lr"] = lr
            scheduler._last_lr = rates
    for key, value in saved["engine"].items():
        setattr(engine, key, value)


def _set_full(param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Put the whole fp32 ``value`` (weight when ``key`` is None, else that optimizer state) into
    this rank's partition of ``param``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    z3 = getattr(param, "_z3_optimizer", None)
    if z3 is None:  # ZeRO 1/2: DeepSpeed's own setters
        if key is None:
            safe_set_full_fp32_param(param, value.to(param.device))
        else:
            safe_set_full_optimizer_state(param, value.to(param.device), key)
        return
    # ZeRO 3: DeepSpeed's setter reads past the end of a parameter whose last partition is padding
    # (one of 2 elements on rank 1 fails); copy this rank's slice, padding stays zero as in training.
    partition, _ = z3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * z3._get_param_partition_rank(param)
    piece = value.flatten()[start : start + partition.numel()]
    partition.data.zero_()
    partition.data[: piece.numel()].copy_(piece)


def _fresh_state(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], index: int, flat: torch.Tensor, optimizer
) -> dict[str, Any]:
    keys = {k.split(SEP, 1)[1] for k in tensors if not k.startswith(GROUP)} - {"fp32"}
    any_param = next(k.split(SEP, 1)[0] for k in tensors if not k.startswith(GROUP))
    fresh: dict[str, Any] = {
        key: torch.zeros_like(flat, dtype=tensors[f"{any_param}{SEP}{key}"].dtype) for key in sorted(keys)
    }
    group = optimizer.optimizer.param_groups[index] if index < len(optimizer.optimizer.param_groups) else {}
    on_device = group.get("fused") or group.get("capturable")  # torch keeps Adam's step on the param's device then
    prefix = f"{GROUP}{index}{SEP}"
    for name, value in tensors.items():
        if name.startswith(prefix):
            fresh[name[len(prefix) :]] = value.clone().to(flat.device if on_device else "cpu")
    for name, value in scalars.items():
        if name.startswith(prefix):
            fresh[name[len(prefix) :]] = value
    return fresh


def _scalar(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], index: int, key: str, current: Any) -> Any:
    name = f"{GROUP}{index}{SEP}{key}"
    if name in tensors:
        value = tensors[name]
        return value.to(current.device).clone() if torch.is_tensor(current) else value.item()
    if name in scalars:
        return scalars[name]
    raise ValueError(f"--resume: the checkpoint has no optimizer value {name}; start a new --output")


def _check_names(tensors: dict[str, torch.Tensor], params, directory: Path) -> None:
    saved = {k.split(SEP, 1)[0]: v.shape for k, v in tensors.items() if k.endswith(f"{SEP}fp32")}
    ours = {name: param.ds_shape if hasattr(param, "ds_shape") else param.shape for name, param in params}
    missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    wrong = sorted(n for n in set(ours) & set(saved) if tuple(saved[n]) != tuple(ours[n]))
    if missing or extra or wrong:
        raise ValueError(
            f"--resume: the trainable parameters of {directory} are not this run's (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, other shapes {wrong[:3]}); resume with the flags it was trained with"
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"--resume: {path} is not a readable safetensors file ({err}); start a new --output") from err


# --- random number generators ------------------------------------------------------------------


def rng_file(directory: Path, rank: int) -> Path:
    """Where ``rank`` keeps its generator states in a checkpoint."""
    return directory / f"rng-rank{rank}.safetensors"


def save_rng(directory: Path, rank: int) -> None:
    """This process's Python, NumPy, torch CPU and (when there is one) CUDA generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = value
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    metadata = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([kind, keys.tolist(), position, has_gauss, cached]),
    }
    atomic_write(rng_file(directory, rank), save(tensors, metadata=metadata))


def load_rng(directory: Path, rank: int) -> None:
    """Restore what :func:`save_rng` wrote for ``rank`` (CUDA states only onto as many devices)."""
    path = rng_file(directory, rank)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        version, internal, gauss = json.loads(metadata["python"])
        kind, keys, position, has_gauss, cached = json.loads(metadata["numpy"])
    except Exception as err:  # a missing, damaged or foreign file
        raise ValueError(f"--resume: {path} is not a readable RNG state ({err}); start a new --output") from err
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
