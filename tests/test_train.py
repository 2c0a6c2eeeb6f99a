"""End-to-end tests of `latentdiff train` / `eval-autoencoder` on tiny models: outputs, resume, NaN guard."""

import json

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.cli import main
from latentdiff.train.loop import NonFiniteGuard, ResumableBatchSampler

TINY = [  # a model small enough to train in a second
    "model.ch=16", "model.ch_mult=1,2", "model.norm_groups=8", "model.z_channels=2", "model.embed_dim=2",
    "model.resolution=16", "data.image_size=16", "data.limit=64", "train.batch_size=4", "train.log_every=2",
    "train.ckpt_every=3", "train.sample_every=3", "train.warmup_steps=2", "loss.perceptual=none",
    "loss.disc_ndf=8", "loss.disc_layers=2", "loss.disc_start=2", "train.threads=1",
]


def run_train(tmp_path, name, *extra, config="configs/kl-f4-fmnist.yaml"):
    out = tmp_path / name
    code = main(["train", config, *TINY, f"train.out_dir={out}", *extra])
    return code, out


def latest_weights(run_dir):
    step = (run_dir / "checkpoints" / "latest").read_text()
    return load_file(str(run_dir / "checkpoints" / step / "model.safetensors"))


def test_training_writes_checkpoints_logs_and_grids(tmp_path):
    code, out = run_train(tmp_path, "kl", "train.steps=6")
    assert code == 0
    assert (out / "config.yaml").is_file() and (out / "reconstructions.png").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    ckpt = out / "checkpoints" / "step_0000006"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "train_state.pt"}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["step"] == 6 and config["model"]["ch"] == 16 and config["loss"]["perceptual"] == "none"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert "d_loss" in rows[-1] and "g_loss" in rows[-1] and "kl" in rows[0]  # GAN from step 2 on
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "loss", "rec", "pixel"]

    results_file = tmp_path / "eval.json"
    assert main(["eval-autoencoder", str(out), "--limit", "8", "--batch-size", "4", "-o", str(results_file)]) == 0
    results = json.loads(results_file.read_text())
    assert results["images"] == 8 and results["downsample_factor"] == 2
    for key in ("psnr", "ssim", "perceptual_efficientnet", "frechet_distance_efficientnet_lite0"):
        assert isinstance(results[key], float) and results[key] == results[key], key


def test_vq_training_and_eval_report_codebook_usage(tmp_path):
    code, out = run_train(tmp_path, "vq", "train.steps=3", "model.n_embed=16", "model.restart_every=2",
                          config="configs/vq-f4-fmnist.yaml")
    assert code == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["codebook_usage"] <= 1 and rows[-1]["perplexity"] >= 1
    results_file = tmp_path / "eval.json"
    assert main(["eval-autoencoder", str(out), "--limit", "8", "--perceptual", "none", "-o",
                 str(results_file)]) == 0
    results = json.loads(results_file.read_text())
    assert 0 < results["codebook_usage"] <= 1 and 1 <= results["codebook_perplexity"] <= 16


def test_resume_continues_exactly(tmp_path):
    """A run stopped after its step-3 checkpoint and resumed ends with the same weights as one run."""
    assert run_train(tmp_path, "full", "train.steps=6")[0] == 0
    assert run_train(tmp_path, "part", "train.steps=3")[0] == 0
    part = tmp_path / "part"
    assert main(["train", "--resume", str(part), "train.steps=6"]) == 0
    full_w, resumed_w = latest_weights(tmp_path / "full"), latest_weights(part)
    assert full_w.keys() == resumed_w.keys()
    for k in full_w:
        assert torch.equal(full_w[k], resumed_w[k]), k
    rows = [json.loads(line)["step"] for line in (part / "log.jsonl").read_text().splitlines()]
    assert rows == [2, 3, 4, 6]  # the part run logged its last step (3) before stopping


def test_non_finite_losses_stop_the_run_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from latentdiff.autoencoder.losses import AutoencoderLoss

    original = AutoencoderLoss.generator_loss

    def nan_loss(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", nan_loss)
    code, out = run_train(tmp_path, "nan", "train.steps=20", "train.max_nonfinite=3")
    assert code == 2
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row" in err and "Traceback" not in err


def test_guard_counts_only_consecutive_failures():
    guard = NonFiniteGuard(limit=2)
    assert not guard.check(torch.tensor(float("inf")), 0)
    assert guard.check(torch.tensor(1.0), 1)
    assert not guard.check(torch.tensor(float("nan")), 2)
    with pytest.raises(FloatingPointError):
        guard.check(torch.tensor(float("nan")), 3)
    assert guard.total == 3


def test_batch_order_depends_only_on_the_step_and_shards_split_the_global_batch():
    full = iter(ResumableBatchSampler(20, 4, seed=1))
    batches = [next(full) for _ in range(12)]
    resumed = iter(ResumableBatchSampler(20, 4, seed=1, start_step=7))
    assert [next(resumed) for _ in range(5)] == batches[7:]
    assert sorted(sum(batches[:5], [])) == list(range(20))  # one epoch covers every item once
    ranks = [iter(ResumableBatchSampler(20, 2, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    for step in range(6):
        shards = [next(r) for r in ranks]
        assert sorted(shards[0] + shards[1]) == sorted(batches[step])


@pytest.mark.parametrize("argv,message", [
    (["train", "missing.yaml"], "config file not found"),
    (["train", "configs/kl-f4-fmnist.yaml", "model.chh=3"], "did you mean 'ch'"),
    (["train"], "give a CONFIG.yaml"),
    (["train", "configs/kl-f4-fmnist.yaml", "data.channels=3"], "data.channels (3) must equal model.in_channels"),
    (["train", "configs/kl-f4-fmnist.yaml", "train.log_every=-1"], "train.log_every must be >= 0"),
    (["eval-autoencoder", "nowhere"], "checkpoint not found"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 2 ends where 1 process x batch 4 does."""
    import os
    import subprocess
    import sys

    common = [*TINY, "model.n_embed=16", "model.restart_dead_codes=false", "loss.disc_weight=0", "train.steps=3",
              "train.lr=1e-3"]
    single = tmp_path / "single"
    assert main(["train", "configs/vq-f4-fmnist.yaml", *common, "train.batch_size=4", f"train.out_dir={single}"]) == 0
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
         "latentdiff.cli", "train", "configs/vq-f4-fmnist.yaml", *common, "train.batch_size=2",
         f"train.out_dir={ddp}", "train.device=cpu"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = latest_weights(single), latest_weights(ddp)
    for k in a:
        if k.endswith("attn_1.k.bias"):
            # Softmax ignores a bias on the keys (it shifts every logit of a query equally), so its true
            # gradient is 0 and Adam turns the rounding noise of either run into unrelated steps.
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_running_means_and_time_limit():
    from latentdiff.train.loop import DistEnv, RunClock, RunningMeans, TrainConfig, time_is_up

    means = RunningMeans()
    means.add({"loss": torch.tensor(1.0), "kl": 4.0})
    means.add({"loss": torch.tensor(3.0), "kl": float("nan")})  # a NaN term is left out of its mean
    assert means.flush() == {"loss": 2.0, "kl": 4.0}
    assert means.flush() == {}

    def clock(wall: float = 0.0, cpu: float = 0.0) -> RunClock:
        c = RunClock(cpu_offset=100.0)
        c.wall0 -= wall
        c.cpu0 -= cpu
        return c

    env = DistEnv()
    assert not time_is_up(TrainConfig(time_limit_minutes=0.0), clock(wall=1e6), env)
    assert time_is_up(TrainConfig(time_limit_minutes=0.5), clock(wall=31), env)
    assert not time_is_up(TrainConfig(time_limit_minutes=0.5), clock(wall=29), env)
    # The CPU clock counts this process's CPU time of this session, not the wall time nor earlier sessions.
    cpu_cfg = TrainConfig(time_limit_minutes=0.5, time_limit_clock="cpu")
    assert not time_is_up(cpu_cfg, clock(wall=1e6), env)
    assert time_is_up(cpu_cfg, clock(cpu=31), env)
    assert clock(cpu=31).total_cpu() >= 131.0
    with pytest.raises(ValueError, match="time_limit_clock"):
        time_is_up(TrainConfig(time_limit_minutes=0.5, time_limit_clock="gpu"), clock(), env)


def test_decoder_only_fine_tuning_keeps_the_encoder_bit_identical(tmp_path):
    assert run_train(tmp_path, "base", "train.steps=3")[0] == 0
    base = tmp_path / "base"
    code, out = run_train(tmp_path, "ft", "train.steps=3", f"init_from={base}", "train_only=decoder",
                          "train.lr=1e-2")
    assert code == 0
    before, after = latest_weights(base), latest_weights(out)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2


def test_mask_decoder_training_changes_only_the_mask_decoder(tmp_path):
    assert run_train(tmp_path, "base", "train.steps=3")[0] == 0
    base = tmp_path / "base"
    code, out = run_train(tmp_path, "masked", "train.steps=3", f"init_from={base}", "train_only=mask_decoder",
                          "model.mask_decoder=true", "train.lr=1e-2")
    assert code == 0
    before, after = latest_weights(base), latest_weights(out)
    assert set(after) - set(before) and all(k.startswith("mask_decoder.") for k in set(after) - set(before))
    assert all(torch.equal(before[k], after[k]) for k in before)  # encoder, plain decoder: untouched
    cond_out = [k for k in after if k.startswith("mask_decoder.cond_out.") and k.endswith(".weight")]
    assert cond_out and all(after[k].abs().sum() > 0 for k in cond_out)  # trained away from their zero start
    copied = [k for k in after if k.startswith("mask_decoder.decoder.")]
    assert sum(not torch.equal(after[k], before[k[len("mask_decoder."):]]) for k in copied) > len(copied) // 2
    grid = out / "reconstructions.png"
    assert grid.is_file()


@pytest.mark.parametrize("extra,message", [
    (["train_only=decoder"], "set init_from to its checkpoint"),
    (["train_only=encoder"], "train_only must be one of all, decoder, mask_decoder"),
    (["init_from={base}", "train_only=mask_decoder"], "train_only: mask_decoder needs model.mask_decoder: true"),
    (["model.mask_decoder=true"], "model.mask_decoder: true is trained after the autoencoder"),
    (["init_from={base}", "model.ch=32"], "has another architecture (model.ch differ)"),
    (["init_from={nowhere}"], "checkpoint not found"),
])
def test_init_from_errors(tmp_path, capsys, extra, message):
    assert run_train(tmp_path, "base", "train.steps=1")[0] == 0
    names = {"base": tmp_path / "base", "nowhere": tmp_path / "nowhere"}
    code, _ = run_train(tmp_path, "bad", "train.steps=1", *[e.format(**names) for e in extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
