"""Pieces every training loop shares: the run config, distributed setup, a resumable data order,
the metric log, the non-finite-loss guard and RNG state capture."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from latentdiff.config import check_ranges
from latentdiff.data import seed_worker
from latentdiff.data.buckets import BucketBatchSampler
from latentdiff.data.shards import ShardDataset, ShardStream
from latentdiff.device import select_device
from latentdiff.io.atomic import write_errors, write_text
from latentdiff.train.tensorboard import check_tensorboard

logger = logging.getLogger(__name__)


PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    out_dir: str = "runs/run"
    steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * world size
    lr: float = 2e-4
    disc_lr: float = 0.0  # 0: same as lr
    betas: tuple[float, ...] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "none"  # "none" or "cosine" (from lr after warm-up down to lr * min_lr_ratio at `steps`)
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimiser step
    gradient_checkpointing: bool = False  # recompute the UNet blocks' activations in backward (less memory)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA)
    strategy: str = "ddp"  # ddp | fsdp (fully_shard, sharded checkpoints); how several processes share the model
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    num_workers: int = 0
    seed: int = 0
    # Steps between log rows, checkpoints and sample grids; 0: only at the end of the run (the last step always
    # logs, checkpoints and samples).
    log_every: int = 25
    ckpt_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 2
    eval_images: int = 512  # test images for the end-of-run metrics
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    time_limit_minutes: float = 0.0  # stop (and checkpoint) after this much time (see time_limit_clock); 0: no limit
    time_limit_clock: str = "wall"  # "wall": elapsed time; "cpu": this process's CPU time (fair under contention)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("steps", "batch_size", "lr", "max_nonfinite"), fractions=("min_lr_ratio",),
                     non_negative=("disc_lr", "weight_decay", "warmup_steps", "grad_clip", "threads", "num_workers",
                                   "seed", "keep_checkpoints", "eval_images", "time_limit_minutes"))
        if not self.betas or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be numbers in [0, 1), got {list(self.betas)}")
        for name in ("log_every", "ckpt_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0: only at the end of the run), got "
                                 f"{getattr(self, name)}")
        choices = {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "strategy": STRATEGIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check_tensorboard(self.tensorboard)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment, or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=select_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type != "cpu":
        device = torch.device(device.type, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    backend = "gloo" if device.type == "cpu" else "nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches from a seeded permutation per epoch, starting at any global step.

    The order depends only on (seed, step), so a resumed run sees exactly the batches the interrupted
    one would have. With W processes, the global batch of step s is a slice of the permutation and
    process r takes every W-th item of it: W processes with batch B see the same set as one with W*B.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch, self.seed = dataset_len, batch_size, seed
        self.rank, self.world = rank, world_size
        self.global_batch = batch_size * world_size
        if self.n < self.global_batch:
            raise ValueError(f"the dataset has {self.n} items, fewer than one global batch ({self.global_batch})")
        self.per_epoch = self.n // self.global_batch
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            for b in range(offset, self.per_epoch):
                chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
                yield chunk[self.rank::self.world].tolist()
                step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a length for progress display
        return self.per_epoch


def make_loader(dataset: Dataset, cfg: TrainConfig, env: DistEnv, start_step: int) -> Iterator[dict[str, Any]]:
    """Endless batches from ``start_step`` on, the same a run that never stopped would see: a shard set streams
    (``ShardStream``), a bucketed dataset is drawn by ``BucketBatchSampler`` (batches within one aspect-ratio
    bucket), any other dataset is indexed by ``ResumableBatchSampler``."""
    workers = {"num_workers": cfg.num_workers, "pin_memory": env.device.type != "cpu",
               "persistent_workers": cfg.num_workers > 0,
               "worker_init_fn": seed_worker if cfg.num_workers > 0 else None}
    if isinstance(dataset, ShardDataset):
        stream = ShardStream(dataset, cfg.batch_size, cfg.seed, start_step, env.rank, env.world_size, cfg.num_workers)
        return iter(DataLoader(stream, batch_size=cfg.batch_size, **workers))
    if getattr(dataset, "item_buckets", None) is not None:
        sampler = BucketBatchSampler(dataset.item_buckets, cfg.batch_size, cfg.seed, start_step, env.rank,
                                     env.world_size)
    else:
        sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_step, env.rank, env.world_size)
    return iter(DataLoader(dataset, batch_sampler=sampler, **workers))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or a cosine decay to ``min_lr_ratio`` at ``steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "none":
        return 1.0
    if cfg.lr_decay == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_decay {cfg.lr_decay!r}; choose 'none' or 'cosine'")


class MetricLog:
    """Appends one row per logged step to ``log.jsonl`` and ``log.csv`` (fixed columns, blanks allowed)."""

    def __init__(self, run_dir: Path, columns: list[str], resume_step: int | None = None) -> None:
        self.jsonl, self.csv = run_dir / "log.jsonl", run_dir / "log.csv"
        self.columns = ["step", *[c for c in columns if c != "step"]]
        if resume_step is not None:
            self._truncate(resume_step)
        if not self.csv.exists():
            write_text(self.csv, _csv_text([self.columns]))

    def _truncate(self, step: int) -> None:
        """Drop rows that an interrupted run logged after its last checkpoint (the files rewritten atomically)."""
        if self.jsonl.exists():
            rows = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_text(self.jsonl, "".join(r + "\n" for r in rows))
        if self.csv.exists():
            with self.csv.open(newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.columns = rows[0]
                write_text(self.csv, _csv_text([rows[0], *[r for r in rows[1:] if int(r[0]) <= step]]))

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        with write_errors(self.jsonl), self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with write_errors(self.csv), self.csv.open("a", newline="") as f:
            csv.writer(f).writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])


def _csv_text(rows: list[list[Any]]) -> str:
    out = io.StringIO(newline="")
    csv.writer(out).writerows(rows)
    return out.getvalue()


class NonFiniteGuard:
    """Counts non-finite losses in a row; the step is skipped and the run stops after too many."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """True when ``loss`` is finite (train on); False means skip this step."""
        if bool(torch.isfinite(loss)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        logger.warning("step %d: non-finite loss (%s), step skipped (%d in a row)", step, float(loss.detach()),
                       self.in_a_row)
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"training stopped at step {step}: {self.in_a_row} non-finite losses in a row; the last good "
                "checkpoint is kept. Lower the learning rate, enable grad clipping or check the data for NaNs.")
        return False


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["accelerator"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "accelerator" in state:
        torch.cuda.set_rng_state(state["accelerator"], device)


def scalar_logs(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        value = float(v)
        out[k] = value if math.isfinite(value) else None
    return out


class RunningMeans:
    """Averages the logged terms of the finite steps since the last ``flush`` (one log row per flush)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, torch.Tensor | float]) -> None:
        # Counted per term: GAN terms appear only from disc_start, and a non-finite term is left out.
        for k, v in scalar_logs(logs).items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> dict[str, float]:
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


class RunClock:
    """Wall time and this process's CPU time since the run (or the resumed session) started.

    CPU time (``time.process_time``: every thread of this process, user + system) is the fair budget when
    runs share a machine: a run slowed down by its neighbours gets the same amount of computation, not the
    same wall time. ``cpu_offset`` carries the CPU seconds of earlier sessions of a resumed run.
    """

    def __init__(self, cpu_offset: float = 0.0) -> None:
        self.wall0, self.cpu0, self.cpu_offset = time.time(), time.process_time(), float(cpu_offset)

    def wall(self) -> float:
        return time.time() - self.wall0

    def cpu(self) -> float:
        """CPU seconds of this session."""
        return time.process_time() - self.cpu0

    def total_cpu(self) -> float:
        """CPU seconds of the whole run, earlier sessions included."""
        return self.cpu_offset + self.cpu()


def time_is_up(cfg: TrainConfig, clock: RunClock, env: DistEnv) -> bool:
    """Whether ``train.time_limit_minutes`` of this session's wall or CPU time (``train.time_limit_clock``) has
    passed; under DDP every rank gets rank 0's answer, so all ranks stop at the same step instead of some
    waiting forever in a collective."""
    if cfg.time_limit_minutes <= 0:
        return False
    if cfg.time_limit_clock not in ("wall", "cpu"):
        raise ValueError(f"train.time_limit_clock must be 'wall' or 'cpu', got {cfg.time_limit_clock!r}")
    elapsed = clock.wall() if cfg.time_limit_clock == "wall" else clock.cpu()
    up = torch.tensor([float(elapsed > 60 * cfg.time_limit_minutes)])
    if env.distributed:
        dist.broadcast(up, src=0)
    return bool(up.item())
