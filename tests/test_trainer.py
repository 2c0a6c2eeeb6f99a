"""The training skeleton with a toy set of hooks (a two-layer regression with dropout and an EMA): checkpoints,
log rows, samples, bit-exact resume, the intervals' 0 ("only at the end"), the time budget, skipped steps."""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from latentdiff.data import DataConfig
from latentdiff.data.transforms import save_image_grid
from latentdiff.train.ema import EMA
from latentdiff.train.loop import TrainConfig
from latentdiff.train.trainer import ScheduledOptimizer, Trainer, WeightAverage


@dataclass
class ToyExperiment:
    task: str = "toy"
    data: DataConfig = field(default_factory=lambda: DataConfig(name="points"))
    train: TrainConfig = field(default_factory=TrainConfig)


class Points(Dataset):
    """y = x . (1, -2, 0.5) + 1 at 40 fixed points."""

    def __init__(self) -> None:
        self.x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 1.0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index]}


class ToyTrainer(Trainer):
    log_columns = ["loss", "lr", "grad_norm", "ema_decay", "skipped", "seconds", "cpu_seconds"]
    nan_at_step = -1  # this step's loss is made NaN

    def build(self, resuming: bool) -> None:
        self.model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.3), nn.Linear(16, 1))  # dropout: global RNG
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.optimizers = {"optimizer": ScheduledOptimizer(self.optimizer, self.cfg.lr)}
        self.ema = EMA(self.model, decay=0.9)
        self.averages = [WeightAverage("ema", self.ema, self.model, prefix="", raw_name="raw")]
        self.use_averages = True
        self.restored_note = None

    def restore(self, weights, config, state) -> None:
        super().restore(weights, config, state)
        self.restored_note = state["note"]

    def training_data(self) -> Dataset:
        return Points()

    def describe(self) -> str:
        return "training a toy regression"

    def prepare_samples(self) -> None:
        self.probe = torch.eye(3)

    def train_step(self, batch, step):
        loss = nn.functional.mse_loss(self.model(batch["x"]).squeeze(-1), batch["y"])
        if step == self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss.detach()} if self.optimizer_step(loss, self.optimizer, step) else None

    def log_values(self) -> dict:
        return {"ema_decay": self.ema.current_decay()}

    def train_state(self) -> dict:
        return {"note": "toy"}

    def save_samples(self, path: Path) -> None:
        with torch.no_grad():
            predictions = self.model.eval()(self.probe).view(1, 1, 1, 3)
        self.model.train()
        save_image_grid(predictions.clamp(-1, 1), path, nrow=1)


def train(out: Path, steps: int, resume: Path | None = None, trainer: type[Trainer] = ToyTrainer,
          **settings) -> Trainer:
    settings = {"batch_size": 4, "lr": 1e-2, "grad_clip": 1.0, "threads": 1, "device": "cpu", "log_every": 2,
                "ckpt_every": 3, "sample_every": 3, "warmup_steps": 2, **settings}
    toy = trainer(ToyExperiment(train=TrainConfig(out_dir=str(out), steps=steps, **settings)), resume=resume)
    assert toy.run() == out
    return toy


def checkpoint(run_dir: Path, step: int | None = None) -> tuple[dict, dict]:
    name = f"step_{step:07d}" if step is not None else (run_dir / "checkpoints" / "latest").read_text()
    folder = run_dir / "checkpoints" / name
    return load_file(str(folder / "model.safetensors")), torch.load(folder / "train_state.pt", weights_only=True)


def log_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_run_writes_checkpoints_log_rows_and_samples(tmp_path):
    out = tmp_path / "run"
    train(out, 6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]
    weights, state = checkpoint(out)
    assert set(state) == {"step", "note", "optimizer", "raw", "ema", "rng", "cpu_seconds"} and state["step"] == 6
    assert json.loads((out / "checkpoints" / "step_0000006" / "config.json").read_text())["task"] == "toy"
    for name, value in state["ema"]["shadow"].items():  # use_averages: the saved weights are the EMA's
        assert torch.equal(weights[name], value)
    assert state["ema"]["num_updates"] == 6
    rows = log_rows(out)
    assert list(rows[0]) == ["step", *ToyTrainer.log_columns]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["loss"]) > 0 and float(r["grad_norm"]) > 0 and r["skipped"] == "0" for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(1e-2)  # the warm-up's second step: factor 2/2
    jsonl = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert list(jsonl[0]) == ["step", *ToyTrainer.log_columns]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert (out / "samples.png").is_file() and (out / "config.yaml").is_file()


def test_resume_continues_bit_for_bit(tmp_path):
    train(tmp_path / "full", 8)
    part = tmp_path / "part"
    train(part, 5)  # stops with a checkpoint at its last step, between two intervals
    first_session_cpu = checkpoint(part)[1]["cpu_seconds"]
    toy = train(part, 8, resume=part)
    assert toy.restored_note == "toy"
    (full_w, full_s), (part_w, part_s) = checkpoint(tmp_path / "full"), checkpoint(part)
    assert full_w.keys() == part_w.keys()
    for k in full_w:
        assert torch.equal(full_w[k], part_w[k]), k
    for k in full_s["raw"]:
        assert torch.equal(full_s["raw"][k], part_s["raw"][k]), k
    assert torch.equal(full_s["rng"]["cpu"], part_s["rng"]["cpu"])
    assert part_s["cpu_seconds"] >= first_session_cpu > 0  # carried over, not reset
    assert [int(r["step"]) for r in log_rows(part)] == [2, 4, 5, 6, 8]
    # Rows 2, 4 and 8 average the same steps in both runs (row 6 of the resumed run has only step 6).
    same = {"2", "4", "8"}
    full_rows, part_rows = log_rows(tmp_path / "full"), log_rows(part)
    assert [r["loss"] for r in full_rows if r["step"] in same] == [r["loss"] for r in part_rows if r["step"] in same]


def test_intervals_of_zero_mean_only_at_the_end(tmp_path):
    out = tmp_path / "run"
    train(out, 4, log_every=0, ckpt_every=0, sample_every=0)
    assert [int(r["step"]) for r in log_rows(out)] == [4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000004"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000004.png"]
    with pytest.raises(ValueError, match="train.ckpt_every must be >= 0"):
        TrainConfig(ckpt_every=-1)


def test_the_time_budget_stops_the_run_with_a_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        train(out, 100, time_limit_minutes=1e-9)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000001"
    assert "time limit of 0.0 min reached at step 1" in caplog.text
    assert (out / "samples.png").is_file()


def test_a_non_finite_step_is_skipped_and_the_averages_wait(tmp_path):
    class NanAtStepTwo(ToyTrainer):
        nan_at_step = 2

    out = tmp_path / "run"
    train(out, 4, trainer=NanAtStepTwo)
    _, state = checkpoint(out)
    assert state["ema"]["num_updates"] == 3
    assert [r["skipped"] for r in log_rows(out)] == ["0", "1"]
