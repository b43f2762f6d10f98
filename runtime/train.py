"""``nugget2d train``: one training loop on a DeepSpeed engine (docs/design.md).

Read top to bottom: configuration, data, model, engine, loop, checkpoints. Run as
``nugget2d train ...`` (one process) or ``deepspeed --module nugget2d.runtime.train ...``.
Longer than ~400 lines because the loop, its flags and its Ray Train entry share one config and one
resume path; the data, objectives and checkpoint files live in their own modules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from importlib.resources import files
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.adapters import set_trainable
from nugget2d.compress.config import BIAS_MODES
from nugget2d.compress.scorer import Scorer

from . import checkpoints
from .checkpoints import STATE, append_line, mark_latest, read_records
from .model_card import CARD, model_card
from .models import load_model
from .objectives import LOSSES, NuggetObjective, ScorerObjective
from .texts import data_files
from .train_data import (
    OBJECTIVES,
    Example,
    Shape,
    batch_at,
    build_examples,
    check_planted_facts,
    collate,
    parse_mix,
    split_heldout,
)
from .train_eval import evaluate
from .train_exclude import ExcludedText, check_exclude_paths

DS_CONFIGS = Path(str(files("nugget2d.ds_configs")))  # ds_configs/ in the repo, or the installed copy


@dataclass
class TrainConfig:
    """Everything a run depends on; saved beside its checkpoints."""

    data: list[str] = field(default_factory=list)
    output: str = "runs/nugget2d"
    model: str | None = None
    objective: str = "autoencode"
    mix: str | None = None  # with objective "mix": NAME=WEIGHT,... e.g. "continue=0.7,recall=0.3"
    ds_config: str = "zero2.json"
    max_steps: int = 100
    batch_size: int = 4
    segment_size: int = 128
    target_size: int = 64
    plant_facts: int = 0  # synthetic rare facts planted in each text segment (runtime/facts.py), e.g. for a scorer
    recent: int = 0  # raw tokens kept beside the nuggets (the hybrid cache of docs/design.md); 0 = nuggets only
    sinks: int = 0  # first tokens kept raw when recent > 0
    distractors: int = 1  # recall and facts examples: segments compressed between the passage and its recall
    exclude: list[str] = field(default_factory=list)  # text files/directories training must never read
    positions: str = "cache"  # how the reader numbers the cache: as sessions do ("cache") or text positions
    lr: float = 1e-4
    warmup_steps: int = 10
    seed: int = 0
    save_every: int = 50
    eval_every: int = 50
    eval_fraction: float = 0.05
    eval_examples: int = 64  # held-out examples evaluated (the first ones of the held-out split)
    bleu_examples: int = 8  # held-out autoencoding examples decoded greedily for BLEU
    ratio: float = 0.1
    scorer_layer: int = 3
    lora_rank: int = 32
    decoder_adapter: bool = False
    init_adapter: str | None = None  # start from this adapter's weights (e.g. an autoencoding run)
    loss: str = "ce"  # cache objectives: "ce", "kl" (to the full-context frozen model) or "ce+kl"
    allocation: str | None = None  # scorer outputs: "token" or "head"; None = "head" for scorer, else the default
    bias_mode: str | None = None  # nuggets' attention bias; None = the init adapter's, else "plain" (see build_model)
    freeze_scorer: bool = False  # cache objectives: only the LoRA trains, the --init-adapter's scorer stays as it is
    scorer_lr: float | None = None  # cache objectives: the scorer's peak learning rate; None = --lr (one group)
    resume: bool = False
    allow_config_change: bool = False  # resume even if the checkpoint's data or trajectory settings differ
    stop_at: int | None = None  # end (with a checkpoint) after this step, as an interrupted run would

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be >= 1")
        if self.plant_facts < 0:
            raise ValueError(f"--plant-facts must be >= 0 (facts planted per text segment), got {self.plant_facts}")
        if not self.data:
            raise ValueError("give training data with --data PATH (text files or directories)")
        if (self.objective == "mix") != bool(self.mix):
            raise ValueError("--mix NAME=WEIGHT,... goes with --objective mix, and mix needs it")
        check_planted_facts([self.objective, *parse_mix(self.mix)], self.plant_facts)
        check_exclude_paths(self.exclude)
        if self.positions not in ("cache", "original"):
            raise ValueError(f"positions must be 'cache' or 'original', got {self.positions!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.allocation not in (None, "token", "head"):
            raise ValueError(f"--allocation must be 'token' or 'head', got {self.allocation!r}")
        if self.bias_mode not in (None, *BIAS_MODES):
            raise ValueError(f"--bias-mode must be one of {list(BIAS_MODES)}, got {self.bias_mode!r}")
        if self.freeze_scorer and (self.objective == "scorer" or not self.init_adapter):
            raise ValueError(
                "--freeze-scorer keeps the --init-adapter's scorer while the LoRA trains: give --init-adapter, "
                "and a cache objective (--objective scorer trains the scorer alone)"
            )
        if self.scorer_lr is not None and (self.scorer_lr <= 0 or self.freeze_scorer or self.objective == "scorer"):
            raise ValueError(
                f"--scorer-lr sets the scorer's learning rate (> 0, got {self.scorer_lr}) while a cache objective "
                "trains the LoRA at --lr: drop it with --freeze-scorer (scorer not trained) or --objective scorer "
                "(the scorer alone, at --lr)"
            )
        if self.objective == "scorer":
            if self.bias_mode == "plain":
                raise ValueError(
                    "--objective scorer saves bias mode straight_through (its scores select entries and never "
                    "bias attention); drop --bias-mode plain"
                )
            if self.loss != "ce":
                raise ValueError(
                    f"--loss {self.loss} applies to the cache objectives; --objective scorer fits the scorer to "
                    "the frozen model's KV importance with its own ranking loss"
                )
            if self.decoder_adapter or self.recent or self.sinks:
                raise ValueError(
                    "--objective scorer trains the scorer alone on whole segments: drop --decoder-adapter, "
                    "--recent and --sinks"
                )
        self.shape  # noqa: B018  (validates the example shape before any work)

    @property
    def shape(self) -> Shape:
        """How examples are cut from the data."""
        return Shape(self.segment_size, self.target_size, self.recent, self.sinks, self.distractors)

    @classmethod
    def from_saved(cls, saved: dict, **overrides) -> TrainConfig:
        """The config a run saved (a checkpoint's ``trainer_state.json`` ``config``, or a ``training/``
        ``config.json``), its other keys ignored and ``overrides`` (e.g. ``data`` where the books now
        lie) applied; settings added since it was saved take their defaults, which reproduce it."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in saved.items() if k in known}, **overrides})


def training_examples(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the examples a run with ``config`` draws its steps from and evaluates on,
    built exactly as :func:`train_loop` builds them (planted facts and ``--exclude`` included)."""
    exclude = ExcludedText.from_paths(config.exclude, tokenizer) if config.exclude else None
    examples = build_examples(
        config.data,
        tokenizer,
        config.objective,
        config.shape,
        parse_mix(config.mix),
        config.seed,
        config.plant_facts,
        exclude,
    )
    return split_heldout(examples, config.eval_fraction, config.seed)


def ds_config_dict(name_or_path: str, batch_size: int) -> dict:
    """Read a DeepSpeed JSON config (a path, or a file name in ``ds_configs/``) and set the batch."""
    path = Path(name_or_path)
    if not path.is_file():
        path = DS_CONFIGS / name_or_path
    if not path.is_file():
        shipped = sorted(p.name for p in DS_CONFIGS.glob("*.json"))
        raise ValueError(f"DeepSpeed config {name_or_path} not found (shipped ones: {shipped})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    config["train_micro_batch_size_per_gpu"] = batch_size
    cuda = torch.cuda.is_available()
    config["bf16"] = {"enabled": cuda}
    zero = config.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        _require_cpu_adam(path)
    return config


def _require_cpu_adam(path: Path) -> None:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if not CPUAdamBuilder().is_compatible(verbose=False):
        raise ValueError(
            f"{path.name} offloads the optimizer to the CPU, which needs DeepSpeed's CPU Adam op, and it cannot be "
            "built here; use zero2.json or zero3.json"
        )


def init_distributed() -> tuple[int, int]:
    """Join (or, run alone, create) the process group: gloo on CPU, nccl on GPU. Returns (rank, world)."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():  # Ray Train made the group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" not in os.environ:  # a single process, not started by a launcher
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """AdamW schedule of the paper: linear warm-up, then cosine decay to 0. The first step already
    trains at ``lr / warmup``: ``transformers.get_cosine_schedule_with_warmup`` starts at 0 and runs one
    step behind through the warm-up (equal after it), so it would change every run's rates."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_model(config: TrainConfig, base) -> Nugget2DModel:
    """The model to train on ``base``: fresh, or from ``--init-adapter`` (its scorer too when its
    allocation is the one asked for, else a fresh scorer). The nuggets' bias mode is ``--bias-mode``,
    else the init adapter's (a selection scorer's scores never became attention biases, so they
    must not start to), else ``plain``; the scorer objective always saves ``straight_through``."""
    scorer_only = config.objective == "scorer"
    bias_mode = "straight_through" if scorer_only else config.bias_mode
    allocation = config.allocation or ("head" if scorer_only else None)
    if config.init_adapter:
        model = Nugget2DModel.from_pretrained(config.init_adapter, base_model=base)
        if scorer_only and model.config.scorer_members > 1:
            raise ValueError(
                f"--init-adapter {config.init_adapter} holds a union of {model.config.scorer_members} scorers; "
                "--objective scorer fits one: start from one member's adapter, then join them with `nugget2d union`"
            )
        model.config.ratio, model.config.bias_mode = config.ratio, bias_mode or model.config.bias_mode
        model.config.positions = config.positions
        if config.decoder_adapter and not model.config.decoder_adapter:  # the reader learns from here on
            model.config.decoder_adapter = True
            set_trainable(model.peft_model, True)
        if allocation and allocation != model.config.allocation:
            heads = (model.num_layers, model.num_kv_heads) if allocation == "head" else None
            model.scorer = Scorer(model.base.config.hidden_size, heads).to(model.device)
            model.config.allocation, model.config.scorer_members = allocation, 1
    else:
        nugget_config = Nugget2DConfig(
            ratio=config.ratio,
            scorer_layer=config.scorer_layer,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_rank,
            bias_mode=bias_mode or "plain",
            positions=config.positions,
            decoder_adapter=config.decoder_adapter,
            allocation=allocation or "token",
        )
        model = Nugget2DModel.from_base(base, nugget_config)
    model.config.base_model = config.model or model.config.base_model
    if scorer_only:  # the LoRA stays as it is (zero, or the init adapter's): only the scorer trains
        for parameter in model.peft_model.parameters():
            parameter.requires_grad_(False)
    if config.freeze_scorer:  # the LoRA learns to read what this scorer keeps
        for parameter in model.scorer.parameters():
            parameter.requires_grad_(False)
    return model


def optimizer_groups(config: TrainConfig, model: Nugget2DModel) -> list:
    """What the optimizer trains: the trainable parameters at ``--lr``, or with ``--scorer-lr`` two
    groups, the LoRA at ``--lr`` and the scorer at its own rate (the schedule scales both alike)."""
    if config.scorer_lr is None:
        return model.trainable_parameters()
    scorer = [parameter for parameter in model.scorer.parameters() if parameter.requires_grad]
    chosen = {id(parameter) for parameter in scorer}
    lora = [parameter for parameter in model.trainable_parameters() if id(parameter) not in chosen]
    return [{"params": lora}, {"params": scorer, "lr": config.scorer_lr}]


def build_objective(config: TrainConfig, model: Nugget2DModel) -> torch.nn.Module:
    """The module DeepSpeed wraps: the scorer's ranking objective or the cache objective with ``--loss``."""
    return ScorerObjective(model) if config.objective == "scorer" else NuggetObjective(model, config.loss)


def train_loop(config: TrainConfig, on_checkpoint: Callable[[Path, dict], None] | None = None) -> list[dict]:
    """Train LoRA + scorer (the scorer alone for ``scorer``) on ``config.objective``; checkpoint
    every ``save_every`` steps; return the per-step metrics. With ``resume`` it continues from the
    latest checkpoint in ``output``. ``on_checkpoint(directory, metrics)`` runs on every rank after
    each checkpoint (Ray reports)."""
    import deepspeed

    # --- data ---------------------------------------------------------------------------------
    output = Path(config.output)
    ds_config = ds_config_dict(config.ds_config, config.batch_size)
    rank, world = init_distributed()
    base, tokenizer = load_model(config.model)
    train, heldout = training_examples(config, tokenizer)
    heldout = heldout[: config.eval_examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- model and engine ---------------------------------------------------------------------
    torch.manual_seed(config.seed)
    model = build_model(config, base)
    read = data_files(config.data, (".txt", ".jsonl", ".json"))
    excluded = data_files(config.exclude, (".txt",)) if config.exclude else []
    data = checkpoints.data_digests(read + excluded)  # both shape a run
    identity = checkpoints.trajectory(asdict(config), data, world)
    resumed = _resumable(output, model, config, identity, rank) if config.resume else None
    objective = build_objective(config, model).train()
    ds_config["optimizer"]["params"]["lr"] = config.lr
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective,
        model_parameters=optimizer_groups(config, model),
        config=ds_config,
        lr_scheduler=lambda optimizer: cosine_with_warmup(optimizer, config.warmup_steps, config.max_steps),
    )
    checkpoints.zero_optimizer(engine)  # checkpoints need one: refuse another config now, not at the first save
    step, seen_before = _restore(engine, *resumed, config, rank) if resumed else (0, 0)
    if rank == 0 and config.resume:  # steps logged after the checkpoint will be run again
        checkpoints.truncate_metrics(output / "metrics.jsonl", step)

    # --- loop ---------------------------------------------------------------------------------
    metrics: list[dict] = []
    bar = tqdm(total=config.max_steps, initial=step, desc="train", file=sys.stderr, disable=rank != 0)
    started, tokens = time.perf_counter(), 0
    last = min(config.max_steps, config.stop_at or config.max_steps)
    while step < last:
        batch = {
            k: v.to(engine.device)
            for k, v in collate(batch_at(train, step, config.batch_size, config.seed, rank, world), pad_id).items()
        }
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        step += 1
        tokens += _batch_tokens(batch) * world
        record = {
            "step": step,
            "loss": loss.item(),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / (time.perf_counter() - started),
            "tokens_seen": seen_before + tokens,
        }
        if step % config.eval_every == 0 or step == config.max_steps:
            record.update(evaluate(engine.module, heldout, pad_id, config.batch_size, tokenizer, config.bleu_examples))
        metrics.append(record)
        if rank == 0:
            append_line(output / "metrics.jsonl", record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update()
        if step % config.save_every == 0 or step == last:
            directory = save_checkpoint(engine, model, output, step, config, rank, seen_before + tokens, data)
            if on_checkpoint is not None:
                on_checkpoint(directory, record)
    bar.close()
    if rank == 0:
        plot_losses(output / "metrics.jsonl", output / "loss.png")
    return metrics


def plot_losses(metrics_path: Path, png: Path) -> Path:
    """Training loss per step (and held-out loss where measured) from ``metrics.jsonl``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    held = [r for r in records if "heldout_loss" in r]
    if held:
        axes.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return png


def save_checkpoint(
    engine,
    model: Nugget2DModel,
    output: Path,
    step: int,
    config: TrainConfig,
    rank: int,
    tokens_seen: int,
    data: list[dict[str, str]],
) -> Path:
    """Adapter directory (with its model card), optimizer state and RNG (safetensors), step, tokens
    seen, config and data digests (JSON), then mark it latest. Every rank calls it (it gathers)."""
    import deepspeed

    directory = output / f"checkpoint-{step}"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    resume_state = checkpoints.save_optimizer(engine, directory, rank)
    checkpoints.save_rng(directory, rank)
    # Under ZeRO-3 large trainable tensors are partitioned: gather them (on every rank) to save whole.
    with deepspeed.zero.GatheredParameters(model.trainable_parameters(), modifier_rank=None):
        if rank == 0:
            model.save_pretrained(directory / "adapter")
    if world > 1:
        torch.distributed.barrier()  # every rank's RNG file is written before `latest` names the checkpoint
    if rank == 0:
        state = {
            "format": checkpoints.FORMAT,
            "step": step,
            "tokens_seen": tokens_seen,
            "config": asdict(config),
            "data": data,
            "trajectory": checkpoints.trajectory(asdict(config), data, world),
            **resume_state,
        }
        checkpoints.atomic_write(directory / STATE, json.dumps(state, indent=2))
        card = model_card(
            asdict(config), read_records(output / "metrics.jsonl"), tokens_seen, _defaults(), model.config.to_dict()
        )
        checkpoints.atomic_write(directory / "adapter" / CARD, card)
        mark_latest(output, directory)
    return directory


def _batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return sum(int(v.sum()) for k, v in batch.items() if k.endswith("mask"))


def _defaults() -> dict:
    return asdict(TrainConfig(data=["-"]))


def _resumable(output: Path, model: Nugget2DModel, config: TrainConfig, identity: dict, rank: int) -> tuple[Path, dict]:
    """The latest checkpoint and its JSON state, once it is known to be safe to read (safetensors +
    JSON only: nothing is unpickled), trained on this base model and, unless ``--allow-config-change``,
    with this data and these settings (``identity``, from :func:`checkpoints.trajectory`)."""
    directory = checkpoints.latest_checkpoint(output)
    checkpoints.refuse_unsafe(directory)
    saved = Nugget2DConfig.load(directory / "adapter")
    if saved.base_model_hash != model.fingerprint:
        raise ValueError(
            f"--resume: {directory} was trained on base model '{saved.base_model}' (fingerprint "
            f"{saved.base_model_hash[:12]}), not on '{model.config.base_model}' ({model.fingerprint[:12]}); "
            "resume with the same --model or start a new --output"
        )
    state = json.loads((directory / STATE).read_text())
    differences = checkpoints.config_differences(state.get("trajectory", {}), identity, _defaults())
    if differences and not config.allow_config_change:
        raise ValueError(
            f"--resume: {directory} was trained with other settings or data, so the run would not continue "
            f"as it began: {'; '.join(differences)}. Resume with the same flags and data, pass "
            "--allow-config-change to continue with the new ones on purpose, or start a new --output"
        )
    if differences and rank == 0:
        print(f"--resume with --allow-config-change: {'; '.join(differences)}", file=sys.stderr)
    return directory, state


def _restore(engine, directory: Path, state: dict, config: TrainConfig, rank: int) -> tuple[int, int]:
    """Load a checkpoint :func:`_resumable` accepted into ``engine`` and this process's generators;
    return (step, tokens seen)."""
    reschedule = any(state["config"].get(k) != getattr(config, k) for k in ("lr", "warmup_steps", "max_steps"))
    checkpoints.load_optimizer(engine, directory, state, reschedule)
    if checkpoints.rng_file(directory, rank).is_file() or not config.allow_config_change:
        checkpoints.load_rng(directory, rank)  # another world size (allowed): ranks without a file keep theirs
    return state["step"], state["tokens_seen"]


def train_with_ray(config: TrainConfig, workers: int, address: str | None = None):
    """Run :func:`train_loop` on ``workers`` Ray Train workers (``TorchTrainer``), each reporting
    its checkpoints with ``ray.train.report``; a local Ray cluster unless ``address`` is given."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    config.output = str(Path(config.output).resolve())
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    cuda = torch.cuda.is_available()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=asdict(config),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cuda),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=RunConfig(storage_path=str(Path(config.output) / "ray"), name="train"),
    )
    return trainer.fit()


def _ray_worker(settings: dict) -> None:
    import ray.train

    def report(directory: Path, record: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory / "adapter"))
        rank = ray.train.get_context().get_world_rank()
        ray.train.report(record, checkpoint=checkpoint if rank == 0 else None)

    train_loop(TrainConfig(**settings), on_checkpoint=report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags (shared by ``nugget2d train`` and ``python -m nugget2d.runtime.train``)."""
    defaults = TrainConfig(data=["-"])
    parser.add_argument(
        "--data", nargs="+", required=True, help="text files / .jsonl files (qa, summarize), or directories of them"
    )
    parser.add_argument("--output", default=defaults.output, help="run directory (checkpoints, metrics)")
    parser.add_argument(
        "--model",
        default=None,
        help="local HF model directory, or gemma3-270m (the nugget2d[gemma] extra; default: embedded SmolLM2-135M)",
    )
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    parser.add_argument("--mix", default=None, help="with --objective mix: weights, e.g. continue=0.7,recall=0.3")
    parser.add_argument("--init-adapter", default=None, help="start from this adapter directory's weights")
    parser.add_argument("--ds-config", default=defaults.ds_config, help="DeepSpeed JSON (a path or a ds_configs/ name)")
    for name in (
        "max_steps",
        "batch_size",
        "segment_size",
        "target_size",
        "recent",
        "sinks",
        "eval_examples",
        "bleu_examples",
        "warmup_steps",
        "seed",
        "save_every",
        "eval_every",
        "scorer_layer",
        "lora_rank",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "ratio", "eval_fraction"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument(
        "--plant-facts",
        type=int,
        default=defaults.plant_facts,
        help="synthetic rare facts (names, numbers, dates) planted in each text segment: teaches a scorer to keep "
        "what the text around it does not predict; the facts objective asks about them",
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="PATH",
        help="text files or directories training must never read, such as your evaluation texts: a segment "
        "that shares a run of 16 tokens with them is left out",
    )
    parser.add_argument(
        "--distractors",
        type=int,
        default=defaults.distractors,
        help="recall and facts examples: text segments compressed between the passage and its recall or question "
        "(default 1; more teaches recall from farther back)",
    )
    parser.add_argument(
        "--freeze-scorer",
        action="store_true",
        help="cache objectives: train the LoRA only, keeping the --init-adapter's scorer as it is (the encoder "
        "learns to read what that scorer keeps)",
    )
    parser.add_argument(
        "--scorer-lr",
        type=float,
        default=defaults.scorer_lr,
        help="cache objectives: the scorer's peak learning rate when it should differ from --lr, e.g. far below it "
        "so a fitted --init-adapter scorer adapts to the LoRA without being re-ranked (default: --lr)",
    )
    parser.add_argument(
        "--positions",
        choices=("cache", "original"),
        default=defaults.positions,
        help="number the reader's cache as streaming sessions do (cache, default) or by text position (original)",
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=defaults.loss,
        help="cache objectives: cross-entropy on the targets (ce), KL to the frozen model reading the full "
        "context (kl), or both (ce+kl)",
    )
    parser.add_argument(
        "--allocation",
        choices=("token", "head"),
        default=None,
        help="what the scorer scores: each token, or each (layer, KV head, token) (default: head for "
        "--objective scorer, token otherwise)",
    )
    parser.add_argument(
        "--bias-mode",
        choices=BIAS_MODES,
        default=None,
        help="cache objectives: a nugget's attention bias is its score (plain) or 0 with the score's gradient "
        "(straight_through); default: the --init-adapter's mode, else plain",
    )
    parser.add_argument(
        "--decoder-adapter", action="store_true", help="train a decoder LoRA too (default: frozen reader)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (resume later)")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even though the data or the training settings differ from the checkpoint's",
    )
    parser.add_argument("--ray", action="store_true", help="run on Ray Train workers (TorchTrainer)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (with --ray)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed flags."""
    known = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in known})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m nugget2d.runtime.train`` (what the deepspeed launcher runs)."""
    parser = argparse.ArgumentParser(prog="nugget2d train")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:  # a user error: one line, as `nugget2d train` prints it
        print(f"nugget2d train: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Train as the flags say: on Ray Train workers with ``--ray``, otherwise in this process."""
    config = config_from_args(args)
    if args.ray:
        train_with_ray(config, args.workers, args.address)
    else:
        train_loop(config)


if __name__ == "__main__":
    sys.exit(main())
