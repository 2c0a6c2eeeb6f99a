"""The one training skeleton: every trainer is a set of hooks on ``Trainer``, which owns the run around them.

``Trainer.run`` does, in this order (the order is part of the contract: a seeded run draws from torch's global
generator when it builds models and reads augmented items, so moving a step would change the initial weights):

1. ``__init__``: join the process group (``setup_distributed``), set the CPU threads, seed torch's global
   generator with ``train.seed + rank``.
2. ``build(resuming)``: the hook makes the model(s), registers its optimisers in ``self.optimizers`` (the
   skeleton schedules, saves and restores them), its weight averages in ``self.averages`` (updated after every
   step that trained, saved and restored with the raw weights they average, and used for samples and the saved
   weights when ``self.use_averages``),
   and wraps what DDP (or FSDP) should synchronise with ``self.distributed(module)``, before it makes that module's
   optimiser and averages (FSDP replaces the parameters).
3. With ``resume``: the latest checkpoint's weights and ``train_state.pt``: ``restore`` (the weights, the hook's
   own state), then the averaged modules' raw weights, the averages and the optimisers (from ``dcp/`` when the
   checkpoint is sharded); the step and the CPU seconds of earlier sessions continue.
4. ``training_data()``; rank 0 makes the run folder, writes ``config.yaml`` and says what it trains;
   ``prepare_data(dataset)`` may swap the dataset for a cached form (the run folder exists by then).
5. The log (``MetricLog``), the resumable batch iterator (``make_loader``), ``prepare_samples()`` on rank 0,
   then the resumed run's RNG state is put back, last, since the steps above draw from the global generator.
6. The step loop: learning rates (``lr_factor``), ``train.grad_accum_steps`` micro-batches each through
   ``train_step(batch, step)`` (which calls ``optimizer_step`` for the guard, backward, and on the last micro-batch
   clipping and the update; DDP/FSDP exchange gradients only then), the averages, a log row every
   ``train.log_every`` steps, ``save_samples`` every ``train.sample_every``, a checkpoint every
   ``train.ckpt_every`` or when the time budget (``train.time_limit_minutes``) is spent. An interval of 0 means
   "only at the end of the run": the last step always logs, samples and checkpoints.
7. The end-of-run samples (``final_samples``) on rank 0 (with FSDP every rank gathers the weights for it, as for
   the sample grids and checkpoints of step 6).

Scale-out settings (docs/scale-out.md) live here, not in the hooks: ``train.precision`` (fp16 gets a gradient
scaler, saved in train_state.pt), ``train.grad_accum_steps`` (the batch iterator counts micro-batches, so a resumed
run reads on exactly; ``draw_rows`` gives per-step draws of the whole accumulated global batch),
``train.gradient_checkpointing`` (modules with ``set_gradient_checkpointing``), ``train.optimizer`` (``adam``),
``train.strategy`` (``distributed``: DDP, or FSDP with sharded checkpoints, train/distributed.py) and
``train.tensorboard``.

A new kind of training (a LoRA, textual inversion, a fine-tune from a Stable Diffusion checkpoint) is a subclass
with its own ``build`` (what is trainable), ``train_step`` (the loss), ``train_state`` (what else to save) and
``save_samples``; a new data source is a ``training_data`` / ``prepare_data``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset
from tqdm import tqdm

from latentdiff.config import save_yaml, to_dict
from latentdiff.data import DataConfig
from latentdiff.device import grad_scaler
from latentdiff.io.checkpoint import load_train_state, read_checkpoint, resolve_checkpoint, save_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.runs import claim_run
from latentdiff.io.state import load_state_strict
from latentdiff.train.distributed import (
    DCP_FOLDER,
    barrier,
    commit_sharded,
    gather_full,
    gradient_sync,
    is_sharded,
    load_sharded,
    save_sharded,
    shard,
    shard_like,
    unsharded,
)
from latentdiff.train.ema import EMA
from latentdiff.train.loop import (
    MetricLog,
    NonFiniteGuard,
    RunClock,
    RunningMeans,
    TrainConfig,
    lr_factor,
    make_loader,
    rng_state,
    set_rng_state,
    setup_distributed,
    time_is_up,
)
from latentdiff.train.optim import make_adam
from latentdiff.train.tensorboard import TensorBoardLog

logger = logging.getLogger(__name__)


class Experiment(Protocol):
    """What the skeleton reads of an experiment dataclass; the rest is the hooks' business."""

    train: TrainConfig
    data: DataConfig


@dataclass
class ScheduledOptimizer:
    """An optimiser whose learning rate follows ``lr_factor`` from its peak ``lr``."""

    optimizer: torch.optim.Optimizer
    lr: float


@dataclass
class WeightAverage:
    """An EMA of ``module``, saved in train_state.pt under ``name`` with the module's raw weights under
    ``raw_name`` (model.safetensors holds the averages when ``use_averages``, so resuming needs both).
    ``prefix`` is the module's place in the trainer's model (``"model."`` for a LatentDiffusion's UNet)."""

    name: str
    ema: EMA
    module: nn.Module
    prefix: str
    raw_name: str


def average_gradients(params: Sequence[nn.Parameter], world_size: int) -> None:
    """All-reduce the mean gradient of parameters outside any DDP wrapper, in one call."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


class Trainer(ABC):
    """The skeleton (see the module docstring); subclasses fill in the abstract hooks and may override the rest."""

    log_columns: ClassVar[list[str]] = []  # log.csv's columns after "step"; a logged value outside them is dropped
    progress_terms: ClassVar[dict[str, str]] = {"loss": "loss"}  # progress-bar label -> logged term
    final_samples: ClassVar[str] = "samples.png"  # the end-of-run samples, in the run folder
    model_name: ClassVar[str] = "model"  # how errors name the model when saved weights do not fit it

    def __init__(self, exp: Experiment, resume: str | Path | None = None, overwrite: bool = False) -> None:
        self.exp, self.cfg, self.resume = exp, exp.train, resume
        self.overwrite = overwrite  # a fresh run may replace the run in out_dir (else refused: io.runs)
        self.env = setup_distributed(self.cfg.device)
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed + self.env.rank)
        self.run_dir = Path(self.cfg.out_dir)
        self.model: nn.Module  # set by build
        self.optimizers: dict[str, ScheduledOptimizer | None] = {}  # train_state key -> optimiser (None: absent)
        self.averages: list[WeightAverage] = []
        self.use_averages = False  # samples and model.safetensors use the averages (train_state: the raw ones)
        self.guard = NonFiniteGuard(self.cfg.max_nonfinite)
        self.grad_norm: float | None = None  # the last clipped gradient norm, for the log
        self.scaler = grad_scaler(self.env.device, self.cfg.precision)  # enabled for fp16 only
        self.accum, self.micro = self.cfg.grad_accum_steps, 0  # micro-batches per step; the current one
        self.wrapped: list[nn.Module] = []  # the DDP / FSDP modules (their gradient sync follows the micro-batches)
        self.stepped = False  # whether an optimiser stepped in the current step (then the averages update)
        self._accumulated: set[int] = set()  # ids of the optimisers that got gradients in the current step
        self.tensorboard: TensorBoardLog | None = None

    # ------------------------------------------------------------------------------------------------ the hooks

    @abstractmethod
    def build(self, resuming: bool) -> None:
        """Make ``self.model``, fill ``self.optimizers`` and ``self.averages``, wrap modules for DDP.

        With ``resuming`` the weights come from the checkpoint afterwards (``restore``): skip any start weights.
        """

    def restore(self, weights: dict[str, torch.Tensor], config: dict[str, Any], state: dict[str, Any]) -> None:
        """Put a checkpoint's saved weights (and the hook's own ``train_state`` entries) back into the model; the
        skeleton then puts the averaged modules' raw weights over the averages model.safetensors may hold."""
        load_state_strict(self.model, weights, self.model_name)

    @abstractmethod
    def training_data(self) -> Dataset:
        """The training set (built before the run folder exists, so a bad data config leaves nothing behind)."""

    def prepare_data(self, dataset: Dataset) -> Dataset:
        """What the steps read: ``dataset`` itself, or a cached form of it (written into the run folder)."""
        return dataset

    @abstractmethod
    def describe(self) -> str:
        """What is trained, for the log line that opens a run."""

    @abstractmethod
    def prepare_samples(self) -> None:
        """Fixed inputs of the sample grids (rank 0 only; before the resumed run's RNG state is put back)."""

    def train_mode(self) -> None:
        self.model.train()

    @abstractmethod
    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, Any] | None:
        """One step on ``batch``; returns the terms to log, or None when the step was skipped (non-finite loss)."""

    def log_values(self) -> dict[str, Any]:
        """Values of this trainer's own log columns (the skeleton fills lr, grad_norm, skipped and the clocks)."""
        return {}

    def train_state(self) -> dict[str, Any]:
        """The hook's own train_state.pt entries (the skeleton adds the step, optimisers, averages and the raw
        weights they average, RNG state and CPU time)."""
        return {}

    def checkpoint_saved(self, folder: Path) -> None:
        """Rank 0, after each checkpoint is in ``folder``: files a trainer writes beside it (a LoRA's adapters)."""
        return None  # most trainers write nothing more

    @abstractmethod
    def save_samples(self, path: Path) -> None:
        """Write a sample grid to ``path`` (rank 0; the averaged weights are in place when ``use_averages``)."""

    # ---------------------------------------------------------------------------------------- helpers for hooks

    def distributed(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped for several processes: in DDP (it then averages its gradients), or with
        ``train.strategy: fsdp`` sharded in place (``fully_shard`` per block; returns ``module`` itself). Build the
        optimisers and averages of a module after this call: sharding replaces its parameters."""
        if not self.env.distributed:
            return module
        wrapped = shard(module, self.env.device) if self.cfg.strategy == "fsdp" else DDP(module)
        self.wrapped.append(wrapped)
        return wrapped

    def adam(self, params: Sequence[nn.Parameter], lr: float, decoupled: bool = True) -> torch.optim.Optimizer:
        """AdamW (or Adam, not ``decoupled``) with ``train.betas`` and ``train.weight_decay``; 8-bit with
        ``train.optimizer: adamw8bit``."""
        cfg = self.cfg
        return make_adam(params, lr, cfg.betas, cfg.weight_decay, cfg.optimizer, self.env.device, decoupled)

    def draw_rows(self, n: int) -> tuple[int, slice]:
        """For random draws made once per step for the whole global batch (``train_step`` draws them from a
        generator of the step): how many rows to draw (every process's ``n`` items of every micro-batch of the
        step) and the slice of them that belongs to this process's current micro-batch (rank r takes every W-th
        row of the micro-batch's block, as the batch sampler deals out items). With one micro-batch: ``n * W``
        rows, ``[rank::W]``."""
        world = self.env.world_size
        block = n * world
        return block * self.accum, slice(self.micro * block + self.env.rank, (self.micro + 1) * block, world)

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, step: int,
                       clip_gradients: bool = True, average: Sequence[nn.Parameter] = ()) -> bool:
        """Backward of this micro-batch's share of the step's loss unless ``loss`` is non-finite (then False:
        nothing is learnt from this micro-batch); on the step's last micro-batch, the update (when some micro-batch
        had a finite loss). Gradients are zeroed at the first micro-batch; fp16 scales the loss (``self.scaler``)
        and unscales the gradients before clipping.

        ``average``: trained parameters outside DDP, whose gradients are averaged over the processes here.
        With ``clip_gradients`` the optimiser's gradients are clipped to ``train.grad_clip`` (when set).
        """
        if self.micro == 0:
            optimizer.zero_grad(set_to_none=True)
            self._accumulated.discard(id(optimizer))
        finite = self.guard.check(loss, step)
        if finite:
            self.scaler.scale(loss if self.accum == 1 else loss / self.accum).backward()
            self._accumulated.add(id(optimizer))
        if self.micro < self.accum - 1 or id(optimizer) not in self._accumulated:
            return finite
        if self.env.distributed and average:
            average_gradients(average, self.env.world_size)
        if clip_gradients and self.cfg.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.grad_norm = float(gather_full(norm))
        self.scaler.step(optimizer)
        self.stepped = True
        return finite

    @contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """Within the block the averaged modules hold their averages when ``use_averages``, and sharded modules
        their full weights (every rank enters the block then; rank 0 samples)."""
        with ExitStack() as stack:
            if self.use_averages:
                for average in self.averages:
                    stack.enter_context(average.ema.average_parameters(average.module))
            stack.enter_context(unsharded(self.wrapped))
            yield

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The weights of model.safetensors: the model's, with the averages in place when ``use_averages``."""
        weights = self.model.state_dict()
        if self.use_averages:
            for average in self.averages:
                weights.update({average.prefix + name: value for name, value in average.ema.shadow.items()})
        return weights

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> Path:
        """Train (or resume) up to ``train.steps`` or the time limit; returns the run directory."""
        with claim_run(self.run_dir, self.resume, self.overwrite, self.env.is_main):  # lock; no fresh run over one
            return self._run_claimed()

    def _run_claimed(self) -> Path:
        cfg, env = self.cfg, self.env
        self.build(resuming=self.resume is not None)
        self._check_scale_out()
        start_step, cpu_offset, saved_rng = self._resume() if self.resume is not None else (0, 0.0, None)
        dataset = self.training_data()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.exp, self.run_dir / "config.yaml")
            logger.info("%s on %s (%d images), device %s, world %d", self.describe(), self.exp.data.name,
                        len(dataset), env.device, env.world_size)
        dataset = self.prepare_data(dataset)
        log = None
        if env.is_main:
            log = MetricLog(self.run_dir, self.log_columns, resume_step=start_step if self.resume else None)
            self.tensorboard = TensorBoardLog(self.run_dir) if cfg.tensorboard else None
        batches = make_loader(dataset, cfg, env, start_step * self.accum)  # the iterator counts micro-batches
        if env.is_main:
            self.prepare_samples()
        if saved_rng is not None:
            set_rng_state(saved_rng, env.device)
        step, clock = self._loop(batches, log, start_step, RunClock(cpu_offset))
        self._samples(self.run_dir / self.final_samples)
        if env.is_main:
            logger.info("finished at step %d in %.1f min; checkpoint in %s", step, clock.wall() / 60,
                        self.run_dir / "checkpoints")
            if self.tensorboard is not None:
                self.tensorboard.close()
        return self.run_dir

    def _check_scale_out(self) -> None:
        """Turn on gradient checkpointing and check FSDP against what ``build`` made, before anything is written."""
        if self.cfg.gradient_checkpointing:
            blocks = [m for m in self.model.modules() if callable(getattr(m, "set_gradient_checkpointing", None))]
            if not blocks:
                raise ValueError(f"train.gradient_checkpointing: the {self.model_name} has no checkpointable blocks "
                                 "(UNets have)")
            for module in blocks:
                module.set_gradient_checkpointing(True)
        if self.cfg.strategy == "fsdp":
            owned = {id(p) for p in self.model.parameters()}
            for name, scheduled in self.optimizers.items():
                params = [p for g in scheduled.optimizer.param_groups for p in g["params"]] if scheduled else []
                if any(id(p) not in owned for p in params):
                    raise ValueError(f"train.strategy fsdp checkpoints the model's weights only, but the optimiser "
                                     f"{name!r} trains weights outside it: use train.strategy=ddp")

    def _optimizer_list(self) -> list[torch.optim.Optimizer]:
        return [scheduled.optimizer for scheduled in self.optimizers.values() if scheduled is not None]

    def _resume(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """Load the latest checkpoint of ``self.resume``; returns its step, the CPU seconds of the sessions before
        and the RNG state, which ``run`` puts back last. A checkpoint with a ``dcp`` folder (``train.strategy:
        fsdp``) has the raw weights, optimisers and averages there, loadable by any number of processes."""
        folder = resolve_checkpoint(self.resume).parent
        state = load_train_state(folder)
        weights, config = read_checkpoint(folder)
        sharded = (folder / DCP_FOLDER).is_dir()
        if not sharded and any(is_sharded(m) for m in self.wrapped):
            raise CheckpointError(f"{folder} has no sharded state ({DCP_FOLDER}/): it was saved with train.strategy "
                                  "ddp; resume it with train.strategy=ddp")
        self.restore(shard_like(weights, self.model), config, state)
        if sharded:
            load_sharded(folder / DCP_FOLDER, self.model, self._optimizer_list(),
                         {average.name: average.ema.shadow for average in self.averages})
            for average in self.averages:
                average.ema.load_state_dict({**state[average.name], "shadow": average.ema.shadow})
        else:
            for name, scheduled in self.optimizers.items():
                if scheduled is not None and state[name] is not None:
                    scheduled.optimizer.load_state_dict(state[name])
            for average in self.averages:
                load_state_strict(average.module, state[average.raw_name], f"{average.raw_name} (raw weights)")
                average.ema.load_state_dict(state[average.name])
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        step = int(state["step"])
        logger.info("resumed from %s at step %d", folder, step)
        return step, float(state.get("cpu_seconds", 0.0)), state["rng"]

    def _due(self, step: int, every: int) -> bool:
        """Whether an every-``every``-steps action falls on ``step``; 0: only at the last step."""
        return step == self.cfg.steps or (every > 0 and step % every == 0)

    def _loop(self, batches: Iterator[dict[str, Any]], log: MetricLog | None, step: int,
              clock: RunClock) -> tuple[int, RunClock]:
        cfg, env = self.cfg, self.env
        progress = tqdm(total=cfg.steps, initial=step, desc="train", disable=not env.is_main, dynamic_ncols=True)
        running = RunningMeans()
        self.train_mode()
        images_per_step = cfg.batch_size * env.world_size * self.accum
        train_seconds, since_row = 0.0, 0  # time in the steps (no samples, checkpoints) since the last log row
        while step < cfg.steps:
            started = time.perf_counter()
            self._step(batches, step, running)
            train_seconds += time.perf_counter() - started
            step += 1
            since_row += 1
            progress.update(1)
            if env.is_main and self._due(step, cfg.log_every):
                throughput = round(images_per_step * since_row / max(train_seconds, 1e-9), 2)
                means = self._log_row(running.flush(), clock, throughput)
                log.write(step, means)
                if self.tensorboard is not None:
                    self.tensorboard.scalars(step, {**means, "lr": self._lr(), "images_per_s": throughput})
                progress.set_postfix({label: f"{means.get(term, float('nan')):.4f}"
                                      for label, term in self.progress_terms.items()})
                train_seconds, since_row = 0.0, 0
            if self._due(step, cfg.sample_every):
                self._samples(self.run_dir / "samples" / f"step_{step:07d}.png", step)
            out_of_time = time_is_up(cfg, clock, env)
            if self._due(step, cfg.ckpt_every) or out_of_time:
                self._checkpoint(step, clock)
            if out_of_time:
                logger.info("time limit of %.1f min reached at step %d", cfg.time_limit_minutes, step)
                break
        progress.close()
        return step, clock

    def _step(self, batches: Iterator[dict[str, Any]], step: int, running: RunningMeans) -> None:
        """One optimiser step: the learning rates, ``train.grad_accum_steps`` micro-batches through ``train_step``
        (gradients exchanged between processes on the last one only), then the loss scale and the averages."""
        for scheduled in self.optimizers.values():
            if scheduled is not None:
                for group in scheduled.optimizer.param_groups:
                    group["lr"] = scheduled.lr * lr_factor(step, self.cfg)
        self.stepped = False
        for micro in range(self.accum):
            self.micro = micro
            batch = next(batches)
            with gradient_sync(self.wrapped, enabled=micro == self.accum - 1):
                logs = self.train_step(batch, step)
            if logs is not None:
                running.add(logs)
        self.micro = 0
        if self.stepped:
            self.scaler.update()
            for average in self.averages:
                average.ema.update(average.module)

    def _samples(self, path: Path, step: int | None = None) -> None:
        """A sample grid at ``path`` by rank 0 (sharded modules: every rank gathers the weights with it); with a
        ``step``, also to TensorBoard."""
        if not (self.env.is_main or any(is_sharded(m) for m in self.wrapped)):
            return
        with self.sampling_weights():
            if self.env.is_main:
                self.save_samples(path)
        if step is not None and self.tensorboard is not None:
            self.tensorboard.image("samples", path, step)

    def _lr(self) -> float:
        first = next(scheduled for scheduled in self.optimizers.values() if scheduled is not None)
        return first.optimizer.param_groups[0]["lr"]

    def _log_row(self, means: dict[str, Any], clock: RunClock, throughput: float) -> dict[str, Any]:
        """The step's means and the run's values, the latter in the order of the log's columns."""
        values = {"grad_norm": self.grad_norm, "lr": self._lr(), **self.log_values(),
                  "skipped": self.guard.total, "images_per_s": throughput, "seconds": round(clock.wall(), 1),
                  "cpu_seconds": round(clock.total_cpu(), 1)}
        means.update({column: values[column] for column in self.log_columns if column in values})
        return means

    def _checkpoint(self, step: int, clock: RunClock) -> None:
        """Rank 0 writes the checkpoint; with ``train.strategy: fsdp`` every rank gathers the full weights with it
        and writes its shards of the raw weights, optimisers and averages (``dcp/``)."""
        sharded = self.cfg.strategy == "fsdp"
        if not (self.env.is_main or sharded):
            return
        weights, hook_state = gather_full(self.checkpoint_weights()), gather_full(self.train_state())
        written = None
        if sharded:
            written = save_sharded(self.run_dir, step, self.model, self._optimizer_list(),
                                   {average.name: average.ema.shadow for average in self.averages}, self.env.is_main)
        if self.env.is_main:
            state = {"step": step, **hook_state}
            if sharded:  # the averages' settings; their shadows, the raw weights and the optimisers are in dcp/
                state.update({a.name: {"decay": a.ema.decay, "warmup": a.ema.warmup,
                                       "num_updates": a.ema.num_updates} for a in self.averages})
            else:
                state.update({name: s.optimizer.state_dict() if s is not None else None
                              for name, s in self.optimizers.items()})
                state.update({average.raw_name: average.module.state_dict() for average in self.averages})
                state.update({average.name: average.ema.state_dict() for average in self.averages})
            if self.scaler.is_enabled():
                state["grad_scaler"] = self.scaler.state_dict()
            state.update({"rng": rng_state(self.env.device), "cpu_seconds": clock.total_cpu()})
            folder = save_checkpoint(self.run_dir, step, weights, to_dict(self.exp), state,
                                     keep=self.cfg.keep_checkpoints,
                                     before_commit=(lambda tmp: commit_sharded(written, tmp)) if sharded else None)
            self.checkpoint_saved(folder)
        if sharded:
            barrier()
