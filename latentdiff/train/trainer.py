"""The one training skeleton: every trainer is a set of hooks on ``Trainer``, which owns the run around them.

``Trainer.run`` does, in this order (the order is part of the contract: a seeded run draws from torch's global
generator when it builds models and reads augmented items, so moving a step would change the initial weights):

1. ``__init__``: join the process group (``setup_distributed``), set the CPU threads, seed torch's global
   generator with ``train.seed + rank``.
2. ``build(resuming)``: the hook makes the model(s), registers its optimisers in ``self.optimizers`` (the
   skeleton schedules, saves and restores them), its weight averages in ``self.averages`` (updated after every
   step that trained, saved and restored with the raw weights they average, and used for samples and the saved
   weights when ``self.use_averages``),
   and wraps what DDP should synchronise with ``self.distributed(module)``.
3. With ``resume``: the latest checkpoint's weights and ``train_state.pt``: ``restore`` (the weights, the hook's
   own state), then the averaged modules' raw weights, the averages and the optimisers; the step and the CPU
   seconds of earlier sessions continue.
4. ``training_data()``; rank 0 makes the run folder, writes ``config.yaml`` and says what it trains;
   ``prepare_data(dataset)`` may swap the dataset for a cached form (the run folder exists by then).
5. The log (``MetricLog``), the resumable batch iterator (``make_loader``), ``prepare_samples()`` on rank 0,
   then the resumed run's RNG state is put back, last, since the steps above draw from the global generator.
6. The step loop: learning rates (``lr_factor``), ``train_step(batch, step)`` (which calls
   ``optimizer_step`` for the guard, backward, clipping and the update), the averages, a log row every
   ``train.log_every`` steps, ``save_samples`` every ``train.sample_every``, a checkpoint every
   ``train.ckpt_every`` or when the time budget (``train.time_limit_minutes``) is spent. An interval of 0 means
   "only at the end of the run": the last step always logs, samples and checkpoints.
7. The end-of-run samples (``final_samples``) on rank 0.

A new kind of training (a LoRA, textual inversion, a fine-tune from a Stable Diffusion checkpoint) is a subclass
with its own ``build`` (what is trainable), ``train_step`` (the loss), ``train_state`` (what else to save) and
``save_samples``; a new data source is a ``training_data`` / ``prepare_data``.
"""

from __future__ import annotations

import logging
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
from latentdiff.io.checkpoint import load_train_state, read_checkpoint, resolve_checkpoint, save_checkpoint
from latentdiff.io.runs import claim_run
from latentdiff.io.state import load_state_strict
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
        """``module`` wrapped in DDP when there are several processes (it then averages its gradients)."""
        return DDP(module) if self.env.distributed else module

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, step: int,
                       clip_gradients: bool = True, average: Sequence[nn.Parameter] = ()) -> bool:
        """Backward and update unless ``loss`` is non-finite (then False: nothing is learnt from it).

        ``average``: trained parameters outside DDP, whose gradients are averaged over the processes here.
        With ``clip_gradients`` the optimiser's gradients are clipped to ``train.grad_clip`` (when set).
        """
        optimizer.zero_grad(set_to_none=True)
        if not self.guard.check(loss, step):
            return False
        loss.backward()
        if self.env.distributed and average:
            average_gradients(average, self.env.world_size)
        if clip_gradients and self.cfg.grad_clip > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        optimizer.step()
        return True

    @contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """Within the block the averaged modules hold their averages when ``use_averages``."""
        with ExitStack() as stack:
            if self.use_averages:
                for average in self.averages:
                    stack.enter_context(average.ema.average_parameters(average.module))
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
        batches = make_loader(dataset, cfg, env, start_step)
        if env.is_main:
            self.prepare_samples()
        if saved_rng is not None:
            set_rng_state(saved_rng, env.device)
        step, clock = self._loop(batches, log, start_step, RunClock(cpu_offset))
        if env.is_main:
            with self.sampling_weights():
                self.save_samples(self.run_dir / self.final_samples)
            logger.info("finished at step %d in %.1f min; checkpoint in %s", step, clock.wall() / 60,
                        self.run_dir / "checkpoints")
        return self.run_dir

    def _resume(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """Load the latest checkpoint of ``self.resume``; returns its step, the CPU seconds of the sessions before
        and the RNG state, which ``run`` puts back last."""
        folder = resolve_checkpoint(self.resume).parent
        state = load_train_state(folder)
        weights, config = read_checkpoint(folder)
        self.restore(weights, config, state)
        for name, scheduled in self.optimizers.items():
            if scheduled is not None and state[name] is not None:
                scheduled.optimizer.load_state_dict(state[name])
        for average in self.averages:
            load_state_strict(average.module, state[average.raw_name], f"{average.raw_name} (raw weights)")
            average.ema.load_state_dict(state[average.name])
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
        while step < cfg.steps:
            batch = next(batches)
            for scheduled in self.optimizers.values():
                if scheduled is not None:
                    for group in scheduled.optimizer.param_groups:
                        group["lr"] = scheduled.lr * lr_factor(step, cfg)
            logs = self.train_step(batch, step)
            if logs is not None:
                for average in self.averages:
                    average.ema.update(average.module)
                running.add(logs)
            step += 1
            progress.update(1)
            if env.is_main and self._due(step, cfg.log_every):
                means = self._log_row(running.flush(), clock)
                log.write(step, means)
                progress.set_postfix({label: f"{means.get(term, float('nan')):.4f}"
                                      for label, term in self.progress_terms.items()})
            if env.is_main and self._due(step, cfg.sample_every):
                with self.sampling_weights():
                    self.save_samples(self.run_dir / "samples" / f"step_{step:07d}.png")
            out_of_time = time_is_up(cfg, clock, env)
            if self._due(step, cfg.ckpt_every) or out_of_time:
                self._checkpoint(step, clock)
            if out_of_time:
                logger.info("time limit of %.1f min reached at step %d", cfg.time_limit_minutes, step)
                break
        progress.close()
        return step, clock

    def _log_row(self, means: dict[str, Any], clock: RunClock) -> dict[str, Any]:
        """The step's means and the run's values, the latter in the order of the log's columns."""
        first = next(scheduled for scheduled in self.optimizers.values() if scheduled is not None)
        values = {"grad_norm": self.grad_norm, "lr": first.optimizer.param_groups[0]["lr"], **self.log_values(),
                  "skipped": self.guard.total, "seconds": round(clock.wall(), 1),
                  "cpu_seconds": round(clock.total_cpu(), 1)}
        means.update({column: values[column] for column in self.log_columns if column in values})
        return means

    def _checkpoint(self, step: int, clock: RunClock) -> None:
        if not self.env.is_main:
            return
        state = {"step": step, **self.train_state(),
                 **{name: s.optimizer.state_dict() if s is not None else None for name, s in self.optimizers.items()},
                 **{average.raw_name: average.module.state_dict() for average in self.averages},
                 **{average.name: average.ema.state_dict() for average in self.averages},
                 "rng": rng_state(self.env.device), "cpu_seconds": clock.total_cpu()}
        folder = save_checkpoint(self.run_dir, step, self.checkpoint_weights(), to_dict(self.exp), state,
                                 keep=self.cfg.keep_checkpoints)
        self.checkpoint_saved(folder)
