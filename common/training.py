"""The training loop every stage shares: accelerate, deterministic data order, crash-safe checkpoints.

- Data order depends only on (seed, epoch): epoch `e` is a permutation seeded by `seed + e`, each
  global batch holds `batch_size * num_processes` rows, and process `r` takes the `r`-th slice. So N
  processes see exactly the rows one process sees with an N-times larger batch, and a resumed run
  continues where the interrupted one stopped.
- A checkpoint is written under a temporary name and renamed when complete; `latest` only ever finds
  complete ones. It holds the weights (safetensors), the optimizer (`torch.load(weights_only=True)`),
  the scheduler and trainer state (JSON) and each process's RNG state; nothing is pickled.
- A NaN or infinite loss stops the run, naming the step, before the optimizer can apply it, so the
  last checkpoint stays good; so does a checkpoint that cannot be written (a full disk), which is removed.
- One run at a time per output folder: the main process holds its lock (`common.locks`), so a second run
  names the process that has it; a run removes the half-written checkpoints that killed runs left.
- Weight decay reaches only the matrices that multiply a layer's input (linear, convolution and attention
  projection weights, and free-standing `proj`/`projection` matrices); biases, norm gains, embeddings,
  positional tables, learned rows such as a null condition, codebooks and temperatures are never decayed.
- Memory and speed: `--gradient_checkpointing` recomputes each block's activations in the backward pass (every
  stage's model offers `set_gradient_checkpointing`), `--compile` runs the model through `torch.compile`, and under
  FSDP2 (`accelerate launch --config_file recipes/accelerate/fsdp.yaml`) weights,
  gradients and optimizer state are sharded across processes: checkpoints then hold the shards (accelerate's
  `save_fsdp_model` / `save_fsdp_optimizer`), and hooks and the final model see the weights gathered in full.
- Streamed data (`common.data.streams.StreamData`: shards, `datasets` streaming) is read by every process and
  worker in parallel; each checkpoint holds every process's stream position (`data-{rank}.json`), so a resumed run
  continues with exactly the batches the uninterrupted one would have drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence, Sized
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    gather_object,
    load_fsdp_model,
    load_fsdp_optimizer,
    save_fsdp_model,
    save_fsdp_optimizer,
)
from accelerate.utils.constants import FSDP_MODEL_NAME
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import StateDictType
from tqdm.auto import tqdm

from common import locks
from common.cli import close_progress_bars, integer
from common.data import SkipReport, add_data_args
from common.data.streams import StreamData, seeded_generator
from common.hub import (
    STORAGE_DTYPES,
    PretrainedModel,
    atomic_write_text,
    respect_umask,
    save_state_dict,
    storage_dtype,
)

CHECKPOINT_PREFIX = "checkpoint-"
SHARED_OUTPUT = "with several machines, --output_dir must be on a filesystem that all of them share"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk); the message names the last complete one."""


LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
TRACKERS = ("none", "tensorboard")


@dataclass
class TrainingConfig:
    """Everything the Trainer reads. The training scripts build it from their flags (`from_args`), which have
    these names and defaults (`add_training_args`); a bad value raises ValueError naming the flag."""

    output_dir: Path  # checkpoints, metrics.jsonl and the final model go here
    seed: int = 0  # data order, augmentation and initialization
    train_batch_size: int = 64  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimizer steps
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"  # one of LR_SCHEDULERS, after a linear warm-up
    lr_warmup_steps: int = 100
    lr_schedule_steps: int | None = None  # the schedule's length (default max_train_steps); may run past the end
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_weight_decay: float = 0.0  # on layer matrices only: see `decays`
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "no"  # one of MIXED_PRECISIONS
    save_dtype: str = "float32"  # the final model's storage type (one of STORAGE_DTYPES); checkpoints stay float32
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    validation_steps: int = 500  # how often the hooks run
    logging_steps: int = 10
    report_to: str = "none"  # one of TRACKERS
    detect_anomaly: bool = False
    dataloader_num_workers: int = 0
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    compile: bool = False  # torch.compile the model
    cpu_threads: int | None = None  # torch threads per process without a GPU (None: see `cpu_threads`)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        at_least_one = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "validation_steps",
            "logging_steps",
        )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu_threads must be at least 1, got {self.cpu_threads}")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name, choices in (
            ("lr_scheduler", LR_SCHEDULERS),
            ("mixed_precision", MIXED_PRECISIONS),
            ("save_dtype", STORAGE_DTYPES),
            ("report_to", TRACKERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.lr_schedule_steps is not None and self.lr_schedule_steps < self.max_train_steps:
            raise ValueError(
                f"--lr_schedule_steps ({self.lr_schedule_steps}) must be at least "
                f"--max_train_steps ({self.max_train_steps})"
            )
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "dataloader_num_workers"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"--adam_epsilon must be positive, got {self.adam_epsilon}")
        if self.report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise ValueError(
                    "--report_to tensorboard needs the tensorboard package: pip install tensorboard"
                ) from err

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The settings from parsed flags (`add_training_args`); the other flags are ignored."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The flags every stage's training script takes (diffusers' names), plus the data flags; `defaults` are the
    stage's own (e.g. `learning_rate=5e-4`)."""
    add_data_args(parser)
    d = TrainingConfig
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", required=True, help="where checkpoints, samples and the model go")
    g.add_argument("--seed", type=integer(0, 2**32 - 1), default=d.seed)  # numpy's seeds are 32-bit
    g.add_argument("--train_batch_size", type=integer(1), default=d.train_batch_size, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=integer(1), default=d.gradient_accumulation_steps)
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--max_train_steps", type=integer(1), default=d.max_train_steps)
    g.add_argument(
        "--lr_schedule_steps",
        type=int,
        default=d.lr_schedule_steps,
        help="length of the learning-rate schedule (default --max_train_steps); longer stops training part-way "
        "along it, and a later run with a larger --max_train_steps resumes on the same schedule",
    )
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument(
        "--adam_weight_decay",
        type=float,
        default=d.adam_weight_decay,
        help="on layer matrices only; never on biases, norms, embeddings, codebooks or the temperature",
    )
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    g.add_argument("--mixed_precision", choices=MIXED_PRECISIONS, default=d.mixed_precision)
    g.add_argument(
        "--save_dtype",
        choices=STORAGE_DTYPES,
        default=d.save_dtype,
        help="type the final model's weights are stored in (float16: half the size); checkpoints stay float32",
    )
    g.add_argument("--checkpointing_steps", type=integer(1), default=d.checkpointing_steps)
    g.add_argument(
        "--checkpoints_total_limit", type=integer(1), default=d.checkpoints_total_limit, help="checkpoints kept"
    )
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')
    g.add_argument(
        "--validation_steps", type=integer(1), default=d.validation_steps, help="sample grid / validation every N steps"
    )
    g.add_argument("--logging_steps", type=integer(1), default=d.logging_steps)
    g.add_argument("--report_to", choices=TRACKERS, default=d.report_to)
    g.add_argument("--detect_anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass instead of keeping them: less memory, "
        "about a third more compute",
    )
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile (first steps slower)")
    g.add_argument(
        "--cpu_threads",
        type=integer(1),
        default=d.cpu_threads,
        help="torch threads per process on a machine without a GPU (default: under accelerate launch, which sets "
        "OMP_NUM_THREADS=1, the machine's cores shared among its processes; otherwise torch's own choice)",
    )
    parser.set_defaults(**defaults)


LAUNCHED_BY_ACCELERATE = "ACCELERATE_DYNAMO_BACKEND"  # in the environment of every process `accelerate launch` starts


def _launcher_chose_one_thread() -> bool:
    """Whether OMP_NUM_THREADS=1 is `accelerate launch`'s own default rather than its user's setting: the launcher
    (this process's parent) started without OMP_NUM_THREADS. Where that cannot be read (no /proc), it is assumed."""
    if LAUNCHED_BY_ACCELERATE not in os.environ or os.environ.get("OMP_NUM_THREADS") != "1":
        return False
    try:
        inherited = Path(f"/proc/{os.getppid()}/environ").read_bytes().split(b"\0")
    except OSError:
        return True
    return not any(entry.startswith(b"OMP_NUM_THREADS=") for entry in inherited)


def cpu_threads(requested: int | None) -> int | None:
    """The torch threads a training process takes: `requested` when given; on a machine without a GPU under
    `accelerate launch`, which sets OMP_NUM_THREADS=1 when its user did not set it (a one-process training would
    then use one core of many), the machine's cores shared among its processes on it; else None, torch's own
    choice (all cores, or OMP_NUM_THREADS)."""
    if requested is not None:
        return requested
    if torch.cuda.is_available() or not _launcher_chose_one_thread():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_cpu_threads(settings: TrainingConfig) -> None:
    """Give this process the torch threads `cpu_threads` chooses; a training script calls it before any work."""
    threads = cpu_threads(settings.cpu_threads)
    if threads is not None:
        torch.set_num_threads(threads)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor


# the layers whose matrices weight decay applies to, and the names of those matrices
DECAYED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
DECAYED_NAMES = frozenset({"weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"})


def decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies to `module`'s own parameter `name`.

    Only matrices that multiply an input are decayed: the weights of linear, convolution and attention layers,
    and free-standing matrices named `...proj` or `...projection` (open_clip's output projections). That is
    open_clip's rule (no decay for `ndim < 2`, norms, biases, `logit_scale`) and nanoGPT's (only 2-D weights),
    with embeddings also left out as in minGPT: token and positional tables, learned rows (a null condition, a
    start token) and codebooks are looked up or added, not multiplied, and decaying them pulls them to zero.
    """
    if param.ndim < 2:
        return False
    if isinstance(module, DECAYED_LAYERS):
        return name in DECAYED_NAMES
    return name.endswith(("proj", "projection"))


def weight_decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters split into (decayed, not decayed), each in `model.parameters()` order."""
    decayed, kept = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:  # a tied parameter is counted once
                seen.add(id(param))
                (decayed if decays(module, name, param) else kept).append(param)
    return decayed, kept


def make_optimizer(model: nn.Module, settings: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: `adam_weight_decay` on the decayed ones, none on the others.

    It is torch's fused AdamW (one kernel for all of a group's tensors, on CPU as on GPU), about three times faster
    than the loop over tensors and the same update up to rounding."""
    decayed, kept = weight_decay_groups(model)
    groups = [
        {"params": params, "weight_decay": decay}
        for params, decay in ((decayed, settings.adam_weight_decay), (kept, 0.0))
        if params
    ]
    return torch.optim.AdamW(
        groups,
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        eps=settings.adam_epsilon,
        fused=True,
    )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing in every part of `model` that offers it (`set_gradient_checkpointing`)."""
    parts = [m for m in model.modules() if hasattr(m, "set_gradient_checkpointing")]
    if not parts:
        raise ValueError(f"--gradient_checkpointing: {type(model).__name__} has no blocks to checkpoint")
    for part in parts:
        part.set_gradient_checkpointing(True)


def describe_groups(model: nn.Module, weight_decay: float) -> str:
    """One line: how many tensors and parameters weight decay reaches, and how many it leaves alone."""

    def size(params: list[nn.Parameter]) -> str:
        return f"{len(params)} tensors ({sum(p.numel() for p in params):,} parameters)"

    decayed, kept = weight_decay_groups(model)
    return f"optimizer: weight decay {weight_decay:g} on {size(decayed)}; none on {size(kept)}"


class StepBatches:
    """Infinite, deterministic batches of `(row, epoch)` keys for one process, from micro-batch `start`.

    With `keys` (e.g. normalized captions), no global batch holds two rows with the same key: rows whose key
    is already in the batch wait for a later one. Contrastive training needs this, since two images with the
    same caption must not be each other's negatives.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        start: int = 0,
        keys: Sequence[Hashable] | None = None,
    ):
        self.global_batch = batch_size * world_size
        if keys is not None and len(keys) != num_rows:
            raise ValueError(f"got {len(keys)} batch keys for {num_rows} rows")
        self.num_rows, self.batch_size, self.rank, self.seed, self.start = num_rows, batch_size, rank, seed, start
        self.keys = keys
        self._cache: dict[int, list[list[int]]] = {}
        if not self._epoch(0):
            distinct = "" if keys is None else f" ({len(set(keys))} distinct captions)"
            raise ValueError(
                f"the training set has {num_rows} rows{distinct}, fewer than one global batch of "
                f"{self.global_batch}; lower --train_batch_size"
            )

    def _epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch."""
        if epoch not in self._cache:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._cache = {epoch: self._distinct(order) if self.keys is not None else self._chunks(order)}
        return self._cache[epoch]

    def _chunks(self, order: list[int]) -> list[list[int]]:
        size = self.global_batch
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    def _distinct(self, order: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        waiting: list[int] = []
        batch: list[int] = []
        seen: set[Hashable] = set()
        for row in order:
            if self.keys[row] in seen:
                waiting.append(row)
                continue
            batch.append(row)
            seen.add(self.keys[row])
            if len(batch) == self.global_batch:
                batches.append(batch)
                batch, seen, still_waiting = [], set(), []
                for w in waiting:  # rows deferred by the last batch go first into this one
                    if len(batch) < self.global_batch and self.keys[w] not in seen:
                        batch.append(w)
                        seen.add(self.keys[w])
                    else:
                        still_waiting.append(w)
                waiting = still_waiting
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, b = 0, self.start
        while b >= len(self._epoch(epoch)):
            b -= len(self._epoch(epoch))
            epoch += 1
        lo = self.rank * self.batch_size
        while True:
            for batch in self._epoch(epoch)[b:]:
                yield [(row, epoch) for row in batch[lo : lo + self.batch_size]]
            epoch, b = epoch + 1, 0


class KeyedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that `(row, epoch)` keys give `transform(sample, generator)`, where the generator
    is seeded by (seed, epoch, row): augmentation is the same whether or not the run was resumed."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int, transform: Callable | None = None):
        self.base, self.seed, self.transform = base, seed, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        row, epoch = key
        sample = self.base[row]
        if self.transform is None:
            return sample
        return self.transform(sample, seeded_generator(self.seed, epoch, row))


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return tensors, {
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [py_version, list(py_state), py_gauss],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, half-written ones are never listed)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


@dataclass
class TrainerHooks:
    """Callbacks `fn(step, model)` run every N steps and at the end, on the main process, with the unwrapped
    model in eval mode; a callback that returns a dict of numbers has them logged."""

    every: list[tuple[int, Callable[[int, torch.nn.Module], dict[str, float] | None]]] = field(default_factory=list)


class Trainer:
    """Runs `compute_loss(model, batch, step) -> (loss, logs)` for `settings.max_train_steps` optimizer steps.

    `logs` maps names to numbers or one-element tensors, read only on the steps that are logged (every
    `logging_steps`), so that other steps do not wait for them; each log also holds `step_seconds` and
    `samples_per_s`, the wall time per step since the previous log (data, checkpoints and hooks included).

    `dataset[i]` is one row, or `dataset` is a `StreamData`; `transform(row, generator)` (augmentation, condition
    dropout) draws from a generator seeded by (seed, epoch, row); `collate` makes a batch of rows; `batch_key`
    (e.g. a row's normalized caption) keeps rows with equal keys out of one batch; `hooks` run every N steps on
    the main process; `hparams` are what a tracker records for the run (default: the settings).
    """

    def __init__(
        self,
        settings: TrainingConfig,
        model: torch.nn.Module,
        dataset: torch.utils.data.Dataset | StreamData,
        compute_loss: Callable[[torch.nn.Module, Any, int], tuple[torch.Tensor, dict[str, float | torch.Tensor]]],
        *,
        collate: Callable | None = None,
        transform: Callable | None = None,
        hooks: TrainerHooks | None = None,
        batch_key: Callable[[str], Hashable] | None = None,
        project: str = "vqclip",
        hparams: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.output_dir = settings.output_dir
        self.accelerator = Accelerator(
            # with no GPU, `accelerate launch --multi_gpu --num_processes N` runs N CPU processes over gloo
            cpu=not torch.cuda.is_available(),
            mixed_precision=settings.mixed_precision,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            log_with=None if settings.report_to == "none" else settings.report_to,
            project_dir=str(self.output_dir),
        )
        if self.accelerator.is_main_process:
            locks.acquire(self.output_dir, "its checkpoints and metrics")  # held until this process ends
            for leftover in (self.output_dir / "checkpoints").glob(".tmp-*"):  # half-written by a killed run
                shutil.rmtree(leftover, ignore_errors=True)
            if settings.report_to != "none":
                tracked = asdict(settings) if hparams is None else hparams
                self.accelerator.init_trackers(project, config={k: str(v) for k, v in tracked.items()})
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.accelerator.is_fsdp2:
            raise ValueError(
                "the launch config asks for FSDP, which this Trainer runs as FSDP2 on GPUs only: set fsdp_version: 2 "
                "(recipes/accelerate/fsdp.yaml), or launch without FSDP on a machine with no GPU"
            )
        if self.accelerator.is_fsdp2:
            if not isinstance(model, PretrainedModel):
                raise ValueError(f"FSDP trains the prior and the contrastive model, not a {type(model).__name__}")
            if self.accelerator.state.fsdp_plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT:
                raise ValueError("FSDP checkpoints are written sharded: set fsdp_state_dict_type: SHARDED_STATE_DICT")
        self.model_class = type(model)  # FSDP2 changes the model's class in place
        torch.autograd.set_detect_anomaly(settings.detect_anomaly)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # no effect on CPU
        if settings.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if settings.compile:
            model.compile()  # in place: names in the state dict, checkpoints and saved models stay the same
        optimizer = make_optimizer(model, settings)
        self.accelerator.print(describe_groups(model, settings.adam_weight_decay))
        if self.accelerator.device.type == "cpu":
            self.accelerator.print(f"torch threads: {torch.get_num_threads()} per process (--cpu_threads)")
        schedule = lr_lambda(
            settings.lr_scheduler, settings.lr_warmup_steps, settings.lr_schedule_steps or settings.max_train_steps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.stream = dataset if isinstance(dataset, StreamData) else None
        self.dataset = dataset if self.stream is not None else KeyedDataset(dataset, settings.seed, transform)
        self.transform = transform
        self.compute_loss = compute_loss
        self.collate = collate
        self.hooks = hooks or TrainerHooks()
        self.batch_key = batch_key
        self.stream_position: dict[str, Any] | None = None  # where a resumed stream continues
        self.gathered: PretrainedModel | None = None  # under FSDP, the trained model in full once `fit` ends
        self.step = 0

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without its wrappers; under FSDP, after `fit`, the full model gathered on the main process."""
        return self.gathered if self.gathered is not None else self.accelerator.unwrap_model(self.model)

    def full_model(self) -> torch.nn.Module | None:
        """The model with every weight in full, on the main process (None on the others): the model itself, or
        under FSDP a copy gathered from every process's shards. Every process must call it."""
        if not self.accelerator.is_fsdp2:
            return self.unwrapped
        state = self.accelerator.get_state_dict(self.model)  # gathered on the main process only
        if not self.accelerator.is_main_process:
            return None
        model = self.model_class(self.unwrapped.config)
        model.load_state_dict(state, strict=True)
        return model.to(self.accelerator.device)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/checkpoint-{step}` atomically; keep at most `checkpoints_total_limit`. A write
        that fails (a full disk) leaves nothing of the new checkpoint and raises CheckpointWriteError."""
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = final.parent / f".tmp-{final.name}"  # never listed as a checkpoint
        try:
            return self._write_checkpoint(final, tmp)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            last = list_checkpoints(self.output_dir)
            kept = f"the last checkpoint, {last[-1]}, is complete and good" if last else "no checkpoint was kept"
            raise CheckpointWriteError(
                f"could not write {final.name} at step {self.step} ({err.strerror or err}; is the disk full?); {kept}:"
                " free some space and run again with --resume_from_checkpoint latest"
            ) from err

    def _write_checkpoint(self, final: Path, tmp: Path) -> Path:
        acc = self.accelerator
        if acc.is_main_process:
            if tmp.exists():  # left by a run killed mid-write
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if not tmp.is_dir():
            raise ValueError(f"{tmp} is not visible to process {acc.process_index}: {SHARED_OUTPUT}")
        tensors, plain = _rng_state()
        save_file(tensors, tmp / f"rng-{acc.process_index}.safetensors")
        (tmp / f"rng-{acc.process_index}.json").write_text(json.dumps(plain), encoding="utf-8")
        if self.stream is not None:
            position = json.dumps(self.stream.position)
            (tmp / f"data-{acc.process_index}.json").write_text(position, encoding="utf-8")
        if acc.is_fsdp2:  # every process writes its shards of the weights and of the optimizer state
            save_fsdp_model(acc.state.fsdp_plugin, acc, self.model, tmp)
            save_fsdp_optimizer(acc.state.fsdp_plugin, acc, self.optimizer, self.model, tmp)
        elif acc.is_main_process:
            if isinstance(self.unwrapped, PretrainedModel):  # a checkpoint is then also a loadable model
                self.unwrapped.write_files(tmp)
            else:
                save_state_dict(self.unwrapped.state_dict(), tmp / "model.safetensors")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        if acc.is_main_process:
            state = {
                "step": self.step,
                "num_processes": acc.num_processes,
                "scheduler": self.scheduler.state_dict(),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            missing = [r for r in range(acc.num_processes) if not (tmp / f"rng-{r}.json").is_file()]
            if missing:
                raise ValueError(f"the checkpoint files of processes {missing} are not in {tmp}: {SHARED_OUTPUT}")
            for f in (f for f in tmp.rglob("*") if f.is_file()):  # FSDP shards lie in subfolders
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
            if final.exists():
                shutil.rmtree(final)
            respect_umask(tmp)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -self.settings.checkpoints_total_limit]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Load `resume_from_checkpoint` (a path or "latest") if given; sets `self.step`."""
        spec = self.settings.resume_from_checkpoint
        if not spec:
            return
        if spec == "latest":
            found = list_checkpoints(self.output_dir)
            if not found:
                self.accelerator.print(f"no checkpoint in {self.output_dir / 'checkpoints'}; starting from step 0")
                return
            path = found[-1]
        else:
            path = Path(spec)
            if not (path / "trainer_state.json").is_file():
                raise ValueError(f"--resume_from_checkpoint {spec}: not a checkpoint folder")
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if self.accelerator.is_fsdp2 != (path / f"{FSDP_MODEL_NAME}_0").is_dir():
            written = "with" if self.accelerator.is_fsdp2 else "without"
            raise ValueError(f"--resume_from_checkpoint {path}: written {written} FSDP; resume it the way it was run")
        if self.accelerator.is_fsdp2:
            plugin = self.accelerator.state.fsdp_plugin
            load_fsdp_model(plugin, self.accelerator, self.model, path)
            load_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, path)
        else:
            self.unwrapped.load_state_dict(load_file(path / "model.safetensors"), strict=True)
            optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            try:
                self.optimizer.load_state_dict(optimizer)
            except ValueError as err:  # e.g. written by an optimizer with one parameter group for every weight
                raise ValueError(
                    f"--resume_from_checkpoint {path}: its optimizer state does not fit this model ({err})"
                ) from err
        self.scheduler.load_state_dict(state["scheduler"])
        rank = self.accelerator.process_index
        if state["num_processes"] == self.accelerator.num_processes:
            plain = json.loads((path / f"rng-{rank}.json").read_text(encoding="utf-8"))
            _set_rng_state(load_file(path / f"rng-{rank}.safetensors"), plain)
        if self.stream is not None:
            if state["num_processes"] != self.accelerator.num_processes:
                raise ValueError(
                    f"{path} was written by {state['num_processes']} processes; a stream resumes exactly only with "
                    "as many"
                )
            self.stream_position = json.loads((path / f"data-{rank}.json").read_text(encoding="utf-8"))
        self.step = int(state["step"])
        metrics = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and metrics.is_file():  # drop what was logged after the checkpoint
            lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= self.step]
            atomic_write_text(metrics, "".join(kept))
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------ the loop

    def _loader(self) -> Iterator[Any]:
        acc = self.accelerator
        if self.stream is not None:
            batches = self.stream.loader(
                batch_size=self.settings.train_batch_size,
                rank=acc.process_index,
                world_size=acc.num_processes,
                transform=self.transform,
                collate=self.collate,
                batch_key=self.batch_key,
                position=self.stream_position,
            )
            for batch in batches:
                yield _to_device(batch, acc.device)
            return
        keys = None if self.batch_key is None else [self.batch_key(text) for text in self.dataset.base.captions]
        batches = StepBatches(
            len(self.dataset),
            self.settings.train_batch_size,
            acc.num_processes,
            acc.process_index,
            self.settings.seed,
            start=self.step * self.settings.gradient_accumulation_steps,
            keys=keys,
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.settings.dataloader_num_workers,
        )
        for batch in loader:
            yield _to_device(batch, acc.device)

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = self.accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), reduction="sum")
        if bad.item() > 0:
            last = list_checkpoints(self.output_dir)
            kept = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise NonFiniteLossError(f"the loss became {loss.item()} at step {self.step + 1}{kept}")

    def fit(self) -> None:
        acc, settings = self.accelerator, self.settings
        self.resume()
        data = self._loader()
        bar = tqdm(total=settings.max_train_steps, initial=self.step, desc="training", disable=not acc.is_main_process)
        self.model.train()
        rows_per_step = settings.train_batch_size * acc.num_processes * settings.gradient_accumulation_steps
        timed_from, timed_since = time.perf_counter(), self.step
        while self.step < settings.max_train_steps:
            logs: dict[str, Any] = {}
            for _ in range(settings.gradient_accumulation_steps):
                batch = next(data)
                with acc.accumulate(self.model):
                    loss, logs = self.compute_loss(self.model, batch, self.step)
                    self._check_finite(loss)
                    acc.backward(loss)
                    if acc.sync_gradients and settings.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            bar.update()
            if self.step % settings.logging_steps == 0 or self.step == settings.max_train_steps:
                # wall time per step since the last log, everything included (data, checkpoints, hooks)
                now = time.perf_counter()
                seconds = (now - timed_from) / (self.step - timed_since)
                timed_from, timed_since = now, self.step
                global_loss = acc.reduce(loss.detach(), reduction="mean")  # the mean over every process
                logs = {"loss": global_loss, **logs, "lr": self.scheduler.get_last_lr()[0]}
                if self.stream is not None:
                    logs["skipped"] = self.stream.report().skipped.total()
                logs = {k: float(v) for k, v in logs.items()}  # tensors are read only here, once per log
                logs.update(step_seconds=seconds, samples_per_s=rows_per_step / seconds)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
                self._log(logs)
            if self.step % settings.checkpointing_steps == 0 or self.step == settings.max_train_steps:
                self.save_checkpoint()
            self.run_hooks(final=self.step == settings.max_train_steps)
        bar.close()
        if acc.is_fsdp2:
            self.gathered = self.full_model()
        acc.end_training()

    def skipped(self, before: SkipReport) -> dict[str, int]:
        """Rows skipped by reason: those of `before` (the data's check before training) and those every process's
        stream skipped as training read it. Every process must call it."""
        counts = Counter(before.skipped)
        if self.stream is not None:
            for found in gather_object([dict(self.stream.report().skipped)]):
                counts.update(found)
        return dict(counts)

    def save_model(self, model: PretrainedModel | None = None) -> PretrainedModel:
        """Save the trained model (or `model`, e.g. the tokenizer inside a GAN wrapper) into the output folder in
        `--save_dtype`, and return it as saved: reloaded when the save rounded its weights, so that the final
        evaluation measures the files."""
        model = model if model is not None else self.unwrapped
        dtype = storage_dtype(self.settings.save_dtype)
        model.save_pretrained(self.output_dir, dtype)
        if dtype is None:
            return model
        return type(model).from_pretrained(self.output_dir, self.accelerator.device)

    def run_hooks(self, final: bool = False) -> None:
        due = [fn for every, fn in self.hooks.every if final or self.step % every == 0]
        model = self.full_model() if due else None  # under FSDP, every process takes part in gathering it
        if not due or not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        model.eval()
        with torch.no_grad():
            for fn in due:
                logs = fn(self.step, model)
                if logs:
                    self._log(logs)
        model.train()
        self.accelerator.wait_for_everyone()

    def _log(self, logs: dict[str, float]) -> None:
        self.accelerator.log(logs, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.step, **logs}) + "\n")


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def write_eval(output_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write a stage's final `eval.json` (atomically) and print it as one JSON line."""
    atomic_write_text(Path(output_dir) / "eval.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return metrics


def require_validation(rows: Sized) -> None:
    """Refuse, at the start, data whose validation split is empty: every stage evaluates the trained model on it."""
    if len(rows) == 0:
        raise ValueError(
            "the data has no validation rows, and every stage evaluates on them: give more rows, a larger "
            "--validation_fraction, a validation/ folder or --validation_shards"
        )


def run_script(main: Callable[[], Any], name: str) -> None:
    """Run a training script's `main`; a ValueError (a bad flag, unusable data, a folder in use), a NaN loss or a
    checkpoint that cannot be written is one line and exit status 2."""
    try:
        main()
    except (ValueError, NonFiniteLossError, CheckpointWriteError) as err:
        close_progress_bars()
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
