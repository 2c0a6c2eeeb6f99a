"""Scale-out settings of the training skeleton on tiny diffusion models: gradient accumulation (= one bigger batch,
exact resume), gradient checkpointing (same loss and gradients), fp16 with its gradient scaler, TensorBoard, the
optimiser key, and FSDP on 2 CPU processes (gloo): the same run as DDP, resumed from its sharded checkpoint by 1
process, and run as 2 "nodes" through torchrun's c10d rendezvous."""

import csv
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from latentdiff.cli import main
from latentdiff.diffusion.unet import UNetConfig, UNetModel

TINY = [  # the class-conditional tiny UNet of test_train_diffusion.py, 4 steps of batch 4 in all
    "model.unet.model_channels=32", "model.unet.num_res_blocks=1", "model.schedule.num_timesteps=50",
    "data.image_size=16", "data.limit=32", "train.log_every=1", "train.ckpt_every=2", "train.sample_every=100",
    "train.warmup_steps=2", "train.threads=1", "train.time_limit_minutes=0", "sample_images=2", "sample_steps=2",
    "ema_decay=0.99", "train.lr=1e-3", "train.device=cpu", "model.class_dropout=0.5", "train.steps=4",
]
CONFIG = "configs/ldm-fmnist-class.yaml"


def checkpoint(run_dir, step=None):
    name = f"step_{step:07d}" if step else (run_dir / "checkpoints" / "latest").read_text().strip()
    folder = run_dir / "checkpoints" / name
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    return load_file(str(folder / "model.safetensors")), state


def losses(run_dir):
    with (run_dir / "log.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def invariant_keys(keys):
    """The last output block's biases: the final GroupNorm (one channel per group here) removes them again, so
    their true gradient is 0 and Adam turns rounding noise into unrelated steps (see test_train_diffusion's DDP
    test)."""
    blocks = [int(k.split("output_blocks.")[1].split(".")[0]) for k in keys if "output_blocks." in k]
    last = max(blocks)
    return {k for k in keys if f"output_blocks.{last}.0.out_layers.3.bias" in k
            or f"output_blocks.{last}.0.skip_connection.bias" in k}


def assert_close_weights(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    skip = invariant_keys(a)
    for k in a:
        if k not in skip:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def train(out, *extra):
    return main(["train", CONFIG, *TINY, f"train.out_dir={out}", *extra])


# ----------------------------------------------------------------------------------------- one process

def test_two_micro_batches_of_b_step_as_one_batch_of_2b_and_resume_exactly(first_stage, tmp_path):
    """accum 2 x batch 2 reads the same items, draws the same noise and averages the same gradient as accum 1 x
    batch 4 (the scale factor is fixed: it would come from the first micro-batch only); stopped after step 2 and
    resumed, it ends bit for bit where the uninterrupted run does (the batch iterator counts micro-batches)."""
    fs = [f"model.first_stage={first_stage}", "model.scale_factor=0.9"]
    assert train(tmp_path / "accum", *fs, "train.batch_size=2", "train.grad_accum_steps=2") == 0
    assert train(tmp_path / "big", *fs, "train.batch_size=4") == 0
    (w_acc, s_acc), (w_big, s_big) = checkpoint(tmp_path / "accum"), checkpoint(tmp_path / "big")
    assert_close_weights(s_acc["model"], s_big["model"])
    assert_close_weights(w_acc, w_big)
    # Each log row is the mean of the step's micro-batch losses: the loss of the big batch.
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)

    part = tmp_path / "part"
    assert train(part, *fs, "train.batch_size=2", "train.grad_accum_steps=2", "train.steps=2") == 0
    assert main(["train", "--resume", str(part), "train.steps=4"]) == 0
    w_part, s_part = checkpoint(part)
    for k in w_acc:
        assert torch.equal(w_acc[k], w_part[k]), k
    for k in s_acc["model"]:
        assert torch.equal(s_acc["model"][k], s_part["model"][k]), k
    with (part / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                                num_res_blocks=1, attention_resolutions=(2,), num_heads=2, context_dim=16))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 40])
    context = torch.randn(2, 5, 16)

    def loss_and_grads():
        unet.zero_grad()
        loss = unet(x, t, context).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    unet.set_gradient_checkpointing(True)
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert any(getattr(m, "use_checkpoint", False) for m in unet.modules())
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_through_the_config_trains_the_same_weights(first_stage, tmp_path):
    fs = [f"model.first_stage={first_stage}", "train.batch_size=4", "train.steps=2", "train.ckpt_every=0"]
    assert train(tmp_path / "plain", *fs) == 0
    assert train(tmp_path / "ckpt", *fs, "train.gradient_checkpointing=true") == 0
    assert_close_weights(checkpoint(tmp_path / "plain")[1]["model"], checkpoint(tmp_path / "ckpt")[1]["model"])


def test_fp16_trains_with_a_gradient_scaler_that_is_saved_and_resumed(first_stage, tmp_path):
    out = tmp_path / "fp16"
    fs = [f"model.first_stage={first_stage}", "train.batch_size=4", "train.precision=fp16", "train.grad_clip=1.0"]
    assert train(out, *fs, "train.steps=2") == 0
    _, state = checkpoint(out)
    scale = state["grad_scaler"]["scale"]
    assert scale > 1 and state["grad_scaler"]["_growth_tracker"] >= 0
    assert main(["train", "--resume", str(out), "train.steps=3"]) == 0
    _, resumed = checkpoint(out)
    assert resumed["step"] == 3 and "grad_scaler" in resumed
    assert all(torch.isfinite(v).all() for v in resumed["model"].values())
    # The scaler's state was put back: the resumed run ends where a straight 3-step run does, scaler included.
    assert train(tmp_path / "straight", *fs, "train.steps=3") == 0
    _, straight = checkpoint(tmp_path / "straight")
    assert resumed["grad_scaler"] == straight["grad_scaler"]
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])
    assert all(x == x for x in losses(out))
    # fp32 runs keep no scaler state (their checkpoints are as before).
    assert train(tmp_path / "fp32", f"model.first_stage={first_stage}", "train.batch_size=4", "train.steps=1") == 0
    assert "grad_scaler" not in checkpoint(tmp_path / "fp32")[1]


def test_tensorboard_gets_losses_lr_throughput_and_sample_grids(first_stage, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "tb"
    assert train(out, f"model.first_stage={first_stage}", "train.batch_size=4", "train.steps=2",
                 "train.sample_every=2", "train.tensorboard=true") == 0
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/grad_norm"):
        assert tag in scalars, scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses(out), rel=1e-5)
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
    assert [e.step for e in events.Images("samples")] == [2]


@pytest.mark.parametrize("extra,message", [
    (["train.optimizer=adamw8bit"], "train.optimizer adamw8bit needs"),
    (["train.optimizer=sgd"], "train.optimizer must be one of adamw, adamw8bit"),
    (["train.strategy=deepspeed"], "train.strategy must be one of ddp, fsdp"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps must be >= 1"),
    (["train.precision=fp8"], "train.precision must be one of fp32, bf16, fp16"),
])
def test_scale_out_settings_fail_in_one_line(first_stage, tmp_path, capsys, extra, message):
    assert train(tmp_path / "bad", f"model.first_stage={first_stage}", "train.batch_size=4", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_gradient_checkpointing_and_fsdp_need_what_the_autoencoder_lacks(tmp_path, capsys):
    tiny_ae = ["model.ch=16", "model.ch_mult=1,2", "model.norm_groups=8", "model.z_channels=2", "model.embed_dim=2",
               "model.resolution=16", "data.image_size=16", "data.limit=8", "train.batch_size=4",
               "loss.perceptual=none", "train.steps=1", "train.threads=1"]
    for extra, message in ((["train.gradient_checkpointing=true"], "has no checkpointable blocks"),
                           (["train.strategy=fsdp"], "trains weights outside it")):
        code = main(["train", "configs/kl-f4-fmnist.yaml", *tiny_ae, f"train.out_dir={tmp_path / 'ae'}", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------------------- several processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(torchrun_args, out, *extra):
    """A torchrun of `latentdiff train` (not waited for), 2 processes x batch 2 = the global batch of 4."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "latentdiff.cli", "train", CONFIG,
         *TINY, "train.batch_size=2", f"train.out_dir={out}", *extra],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_process_runs(first_stage, tmp_path_factory):
    """Started together: DDP and FSDP on one node (2 processes), and FSDP on 2 "nodes" x 1 process through the
    c10d rendezvous (two torchrun agents that find each other at one endpoint)."""
    root = tmp_path_factory.mktemp("scale_out")
    fs = f"model.first_stage={first_stage}"
    single = ["--standalone", "--nproc-per-node", "2"]
    endpoint = f"localhost:{free_port()}"
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", "latentdiff-test"]
    procs = {"ddp": [launch(single, root / "ddp", fs, "train.strategy=ddp")],
             "fsdp": [launch(single, root / "fsdp", fs, "train.strategy=fsdp")],
             "nodes": [launch(node, root / "nodes", fs, "train.strategy=fsdp") for _ in range(2)]}
    for name, group in procs.items():
        for proc in group:
            output = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, f"{name}: {output[-3000:]}"
    return root


def test_fsdp_gives_the_loss_curve_and_weights_of_ddp(two_process_runs):
    ddp, fsdp = two_process_runs / "ddp", two_process_runs / "fsdp"
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-4) and len(losses(ddp)) == 4
    (w_ddp, s_ddp), (w_fsdp, s_fsdp) = checkpoint(ddp), checkpoint(fsdp)
    assert_close_weights(w_ddp, w_fsdp)  # the EMA weights in model.safetensors, gathered from the shards
    # The sharded checkpoint holds the raw weights, AdamW's moments and the EMA by parameter name.
    folder = fsdp / "checkpoints" / "step_0000004"
    assert (folder / "dcp" / ".metadata").is_file() and "model" not in s_fsdp and "optimizer" not in s_fsdp
    dcp_to_torch_save(folder / "dcp", two_process_runs / "fsdp_full.pt")
    full = torch.load(two_process_runs / "fsdp_full.pt", weights_only=False)
    raw = {k[len("model."):]: v for k, v in full["model"].items() if k.startswith("model.diffusion_model.")}
    assert_close_weights(s_ddp["model"], raw)
    assert_close_weights(s_ddp["ema"]["shadow"], full["averages"]["ema"])
    assert s_fsdp["ema"]["num_updates"] == s_ddp["ema"]["num_updates"] == 4
    assert not list((fsdp / "checkpoints").glob("*.tmp"))


def test_a_two_process_fsdp_checkpoint_resumes_in_one_process(two_process_runs, tmp_path):
    """The step-2 checkpoint of the 2-process FSDP run, resumed by 1 process with batch 4 (the same global
    batch, the same draws), ends with the weights of the 2-process run."""
    part = tmp_path / "part"
    shutil.copytree(two_process_runs / "fsdp", part)
    shutil.rmtree(part / "checkpoints" / "step_0000004")
    (part / "checkpoints" / "latest").write_text("step_0000002")
    assert main(["train", "--resume", str(part), "train.batch_size=4"]) == 0
    full_w, _ = checkpoint(two_process_runs / "fsdp")
    part_w, part_s = checkpoint(part)
    assert part_s["step"] == 4
    assert_close_weights(full_w, part_w)
    # Rows up to the checkpoint are kept; after it, log.csv has the 4-item batch's loss, not rank 0's 2 items.
    assert losses(part)[:2] == losses(two_process_runs / "fsdp")[:2] and len(losses(part)) == 4


def test_two_nodes_through_the_c10d_rendezvous_train_as_two_local_processes(two_process_runs):
    nodes, fsdp = two_process_runs / "nodes", two_process_runs / "fsdp"
    assert losses(nodes) == pytest.approx(losses(fsdp), rel=1e-5)
    (w_nodes, _), (w_fsdp, _) = checkpoint(nodes), checkpoint(fsdp)
    assert_close_weights(w_nodes, w_fsdp, rtol=1e-5, atol=1e-6)
