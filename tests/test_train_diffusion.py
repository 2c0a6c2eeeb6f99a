"""End-to-end tests of diffusion training, `latentdiff sample` and `latentdiff eval-nll` on tiny models, and the EMA."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiff.cli import main
from latentdiff.conditioning.conditioner import ConditionerConfig
from latentdiff.config import from_dict
from latentdiff.diffusion.model import LatentDiffusion
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.diffusion.sampling import sample as run_sampler
from latentdiff.io.checkpoint import save_checkpoint
from latentdiff.train.diffusion import step_generator
from latentdiff.train.ema import EMA
from latentdiff.train.latent_cache import read_latent_cache
from latentdiff.train.loop import ResumableBatchSampler

TINY = [  # a UNet on 8x8x4 latents of 16x16 images that trains in well under a second per step
    "model.unet.model_channels=32", "model.unet.num_res_blocks=1", "model.schedule.num_timesteps=50",
    "data.image_size=16", "data.limit=32", "train.batch_size=4", "train.log_every=2", "train.ckpt_every=2",
    "train.sample_every=2", "train.warmup_steps=2", "train.threads=1", "train.time_limit_minutes=0",
    "sample_images=4", "sample_steps=2", "ema_decay=0.99",
]
PIXEL = ["model.unet.channel_mult=1,2", "model.unet.attention_resolutions=2", "model.unet.dropout=0.1"]


def train(out, *extra, config="configs/ldm-fmnist-class.yaml", first_stage=None):
    args = ["train", config, *TINY, f"train.out_dir={out}", *extra]
    if first_stage is not None:
        args.append(f"model.first_stage={first_stage}")
    return main(args)


def latest(run_dir):
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    return load_file(str(ckpt / "model.safetensors")), state, json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def class_run(first_stage, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "class"
    assert train(out, "train.steps=4", first_stage=first_stage) == 0
    return out


def test_latent_training_writes_checkpoints_logs_grids_and_the_scale_factor(class_run):
    out = class_run
    for name in ("config.yaml", "samples.png", "latent_cache/index.json", "log.csv"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(out / "samples.png").size == (4 * 18 + 2, 18 + 2)  # 4 classes in one row of 16px cells
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["loss"] > 0 for r in rows)
    weights, state, config = latest(out)
    assert config["task"] == "diffusion" and config["step"] == 4 and config["model"]["first_stage_config"]["ch"] == 16
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in weights)
    # The saved UNet is the EMA; the raw weights and the EMA state are in train_state for resuming.
    for name, value in state["ema"]["shadow"].items():
        assert torch.equal(weights[f"model.{name}"], value)
    assert any(not torch.equal(state["model"][k], state["ema"]["shadow"][k]) for k in state["model"])
    # The scale factor is 1 / std of the first batch's latents, drawn as the trainer draws them.
    cache = read_latent_cache(out)
    first_batch = next(iter(ResumableBatchSampler(32, 4, seed=0)))
    posterior_params = cache["params"][first_batch]
    mean, logvar = posterior_params.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=step_generator(0, 0))
    latents = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
    assert config["model"]["scale_factor"] == pytest.approx(1 / float(latents.std()), rel=1e-6)


def test_pixel_space_training_and_eval_nll(tmp_path):
    out = tmp_path / "pixel"
    assert train(out, "train.steps=2", "model.schedule.num_timesteps=20", *PIXEL,
                 config="configs/ddpm-fmnist-pixel.yaml") == 0
    weights, state, config = latest(out)
    assert config["model"]["scale_factor"] == 1.0 and config["model"]["first_stage_config"] is None
    assert all(k.startswith("model.diffusion_model.") for k in weights)
    assert read_latent_cache(out)["params"].dtype == torch.uint8  # images, exactly
    result_file = tmp_path / "nll.json"
    assert main(["eval-nll", str(out), "--limit", "4", "--timesteps", "all", "-o", str(result_file)]) == 0
    results = json.loads(result_file.read_text())
    assert results["space"] == "pixels" and results["timesteps"] == "all" and results["num_timesteps"] == 20
    assert 0 < results["bpd"] < 100 and results["timestep_stderr"] == 0.0


def test_resume_is_bit_identical_and_reuses_the_latent_cache(first_stage, tmp_path, monkeypatch):
    # On the CPU. On a GPU two uninterrupted runs already differ in the last bits unless
    # torch.use_deterministic_algorithms(True) is on; with it, resuming is bit-identical there too.
    assert train(tmp_path / "full", "train.steps=4", "train.device=cpu", first_stage=first_stage) == 0
    part = tmp_path / "part"
    assert train(part, "train.steps=2", "train.device=cpu", first_stage=first_stage) == 0
    cache_time = (part / "latent_cache" / "index.json").stat().st_mtime_ns
    calls = []
    original = LatentDiffusion.first_stage_parameters
    monkeypatch.setattr(LatentDiffusion, "first_stage_parameters",
                        lambda self, x: calls.append(len(x)) or original(self, x))
    assert main(["train", "--resume", str(part), "train.steps=4"]) == 0
    assert calls == [] and (part / "latent_cache" / "index.json").stat().st_mtime_ns == cache_time
    (full_w, full_s, full_c), (part_w, part_s, part_c) = latest(tmp_path / "full"), latest(part)
    assert full_w.keys() == part_w.keys() and full_c["model"]["scale_factor"] == part_c["model"]["scale_factor"]
    for k in full_w:
        assert torch.equal(full_w[k], part_w[k]), k
    for k in full_s["model"]:
        assert torch.equal(full_s["model"][k], part_s["model"][k]), k
    assert full_s["ema"]["num_updates"] == part_s["ema"]["num_updates"] == 4
    assert [json.loads(line)["step"] for line in (part / "log.jsonl").read_text().splitlines()] == [2, 4]


def test_without_the_cache_the_first_stage_encodes_every_batch(first_stage, tmp_path, monkeypatch):
    calls = []
    original = LatentDiffusion.first_stage_parameters
    monkeypatch.setattr(LatentDiffusion, "first_stage_parameters",
                        lambda self, x: calls.append(len(x)) or original(self, x))
    assert train(tmp_path / "nocache", "train.steps=2", "cache_latents=false", "train.sample_every=10",
                 config="configs/ldm-fmnist-uncond.yaml", first_stage=first_stage) == 0
    assert calls == [4, 4] and not (tmp_path / "nocache" / "latent_cache").exists()


def test_intervals_of_zero_mean_only_at_the_end_of_the_run(first_stage, tmp_path):
    """``train.sample_every=0`` once crashed with a ZeroDivisionError; 0 now means "only at the last step"."""
    out = tmp_path / "zero"
    assert train(out, "train.steps=3", "train.sample_every=0", "train.log_every=0", "train.ckpt_every=0",
                 first_stage=first_stage) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000003.png"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000003"]
    assert (out / "samples.png").is_file()


def test_sample_writes_a_deterministic_grid(class_run, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    common = [str(class_run), "-n", "5", "--steps", "2", "--sampler", "euler_ancestral"]
    assert main(["sample", *common, "--seed", "1", "--class", "2", "-o", str(a)]) == 0
    assert main(["sample", *common, "--seed", "1", "--class", "2", "-o", str(b)]) == 0
    assert main(["sample", *common, "--seed", "2", "--class", "2", "7", "--guidance", "3", "--karras",
                 "-o", str(c)]) == 0
    assert Image.open(a).size == (3 * 18 + 2, 2 * 18 + 2)  # 5 images, 3 per row
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()


def test_eval_nll_subset_gives_a_finite_bound_and_standard_error(class_run, capsys):
    assert main(["eval-nll", str(class_run), "--limit", "6", "--timesteps", "3", "--seed", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["space"] == "latents" and results["images"] == 6 and results["timesteps"] == 3
    for key in ("bpd", "bpd_stderr", "timestep_stderr", "bpd_unscaled_latents"):
        assert isinstance(results[key], float) and abs(results[key]) < 1e3, key
    assert results["bpd_stderr"] > 0 and results["timestep_stderr"] > 0


def test_sample_help_lists_every_sampler(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SAMPLERS)


@pytest.mark.parametrize("argv,message", [
    (["sample", "{run}", "--sampler", "magic"], "unknown sampler 'magic'"),
    (["sample", "{run}", "--class", "12"], "--class 12 is out of range"),
    (["sample", "{ae}"], "not a diffusion model"),
    (["sample", "{uncond}", "--class", "1"], "this model is unconditional"),
    (["eval-nll", "{run}", "--timesteps", "0"], "--timesteps must be 'all' or a positive integer"),
    (["sample", "nowhere"], "checkpoint not found"),
    (["train", "configs/ldm-fmnist-uncond.yaml", "model.first_stage=nowhere"], "checkpoint not found"),
    (["train", "configs/ldm-fmnist-uncond.yaml", "sampler=magic"], "unknown sampler"),
    (["train", "configs/ldm-fmnist-uncond.yaml", "model.unet.in_channels=3"], "must equal in_channels (3)"),
    (["train", "configs/ldm-fmnist-uncond.yaml", "model.first_stage={ae}", "model.unet.in_channels=3",
      "model.unet.out_channels=3"], "must equal the first stage's embed_dim (4)"),
])
def test_cli_errors_are_one_line(argv, message, class_run, first_stage, tmp_path, capsys):
    uncond = tmp_path / "uncond"
    if "{uncond}" in argv:
        weights, _, config = latest(class_run)
        config["model"].update(conditioning="none", num_classes=0)
        config["model"]["unet"]["num_classes"] = None
        weights = {k: v for k, v in weights.items() if "label_emb" not in k}
        save_checkpoint(uncond, 1, weights, config)
    argv = [a.format(run=class_run, ae=first_stage, uncond=uncond) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_ema_follows_the_litema_formula():
    model = torch.nn.Linear(1, 1, bias=False)
    frozen = torch.nn.Linear(1, 1)
    frozen.requires_grad_(False)
    model.add_module("frozen", frozen)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=True)
    assert set(ema.shadow) == {"weight"}  # frozen parameters are not averaged
    expected = 1.0
    for n, value in enumerate([2.0, 4.0, -1.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        decay = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13: all below 0.9
        expected = expected - (1 - decay) * (expected - value)
        ema.update(model)
        assert float(ema.shadow["weight"]) == pytest.approx(expected, rel=1e-6)
    # By hand: 1 + (9/11)(2 - 1) = 1.818182; + (3/4)(4 - 1.818182) = 3.454545; + (9/13)(-1 - 3.454545) = 0.370629.
    assert float(ema.shadow["weight"]) == pytest.approx(0.370629, abs=1e-6)

    plain = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    plain.update(model)
    assert float(plain.shadow["weight"]) == pytest.approx(-1 + 0.5 * 4)  # from -1 halfway to 3

    with ema.average_parameters(model):
        assert float(model.weight.detach()) == pytest.approx(expected)
    assert float(model.weight.detach()) == 3.0
    restored = EMA(model, decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 3 and restored.decay == 0.9 and torch.equal(restored.shadow["weight"],
                                                                                 ema.shadow["weight"])
    ema.copy_to(model)
    assert float(model.weight.detach()) == pytest.approx(expected)


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(first_stage, tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 2 ends where 1 process x batch 4 does: each sample gets its
    posterior noise, timestep, class dropout and diffusion noise from the global batch's draws, and the scale
    factor comes from the whole first global batch."""
    import os
    import subprocess
    import sys

    common = [*TINY, f"model.first_stage={first_stage}", "train.steps=3", "train.lr=1e-3", "train.device=cpu",
              "model.class_dropout=0.5"]
    single = tmp_path / "single"
    assert main(["train", "configs/ldm-fmnist-class.yaml", *common, "train.batch_size=4",
                 f"train.out_dir={single}"]) == 0
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519", "-m",
         "latentdiff.cli", "train", "configs/ldm-fmnist-class.yaml", *common, "train.batch_size=2",
         f"train.out_dir={ddp}"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (w1, s1, c1), (w2, s2, c2) = latest(single), latest(ddp)
    assert c1["model"]["scale_factor"] == pytest.approx(c2["model"]["scale_factor"], rel=1e-6)
    # Adam moves every weight by about lr = 1e-3 per step, 100x atol: rank-dependent noise would show.
    # Except where the true gradient is 0: the last output block's biases are per-channel constants that the
    # final GroupNorm (one channel per group in this tiny UNet) removes again, so Adam turns either run's
    # rounding noise into unrelated steps (as with the attention key bias in the autoencoder's DDP test).
    last = max(int(k.split(".")[2]) for k in s1["model"] if k.startswith("diffusion_model.output_blocks."))
    invariant = (f"output_blocks.{last}.0.out_layers.3.bias", f"output_blocks.{last}.0.skip_connection.bias")
    for k in s1["model"]:  # the raw UNet weights after 3 AdamW steps
        if not k.endswith(invariant):
            torch.testing.assert_close(s1["model"][k], s2["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    for k in w1:  # the saved EMA weights and the frozen first stage
        if not k.endswith(invariant):
            torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_kill_9_between_checkpoints_then_resume_gives_the_uninterrupted_weights(first_stage, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    common = [*TINY, f"model.first_stage={first_stage}", "train.device=cpu", "train.ckpt_every=4",
              "train.sample_every=100", "train.log_every=4", "train.steps=40"]
    reference = tmp_path / "reference"
    assert main(["train", "configs/ldm-fmnist-class.yaml", *common, f"train.out_dir={reference}"]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", "train", "configs/ldm-fmnist-class.yaml",
                             *common, f"train.out_dir={killed}"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest_file = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere between two checkpoints (or inside the next one's write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = int(latest_file.read_text().split("_")[-1])
    assert 4 <= done < 40
    assert main(["train", "--resume", str(killed)]) == 0
    (ref_w, ref_s, _), (res_w, res_s, _) = latest(reference), latest(killed)
    assert res_s["step"] == ref_s["step"] == 40
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), k
    for k in ref_s["model"]:
        assert torch.equal(ref_s["model"][k], res_s["model"][k]), k
    # The log has each logged step once: the rows the killed run wrote after its last checkpoint are dropped.
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 41, 4))


def test_non_finite_losses_stop_diffusion_training_with_a_clear_message(first_stage, tmp_path, monkeypatch,
                                                                        capsys):
    original = LatentDiffusion.loss

    def nan_loss(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(LatentDiffusion, "loss", nan_loss)
    assert train(tmp_path / "nan", "train.steps=20", "train.max_nonfinite=3", first_stage=first_stage) == 2
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row" in err and "Traceback" not in err
    # Nothing was learned from a NaN: no checkpoint holds NaN weights.
    ckpts = tmp_path / "nan" / "checkpoints"
    for folder in ckpts.glob("step_*") if ckpts.exists() else []:
        assert all(torch.isfinite(v).all() for v in load_file(str(folder / "model.safetensors")).values())


# ---------------------------------------------------------------------------------------------------- conditioning

SCENE_CONFIGS = {  # the tiny first stage has f = 2: 16 px scenes give 8x8 latents, the size of the 8x8 low-res
    # id: (configs/ldm-scenes-<name>.yaml, overrides)
    "txt2img": ("txt2img", []),
    "txt2img-minilm": ("txt2img", ["model.conditioner.text_encoder=minilm", "model.unet.context_dim=384",
                                   "model.conditioner.minilm.max_length=24"]),
    "seg2img": ("seg2img", []),
    "inpaint": ("inpaint", []),
    "upscale": ("upscale", []),
}
TEXT_TRANSFORMER = ["model.conditioner.text_encoder=transformer", "model.unet.context_dim=32",
                    "model.conditioner.text.width=32", "model.conditioner.text.layers=1",
                    "model.conditioner.text.heads=2"]


def scene_inputs(n: int) -> dict:
    from torch.utils.data import default_collate

    from latentdiff.data import DataConfig, build_dataset

    data = build_dataset(DataConfig(name="fmnist_scenes", image_size=16, channels=3, limit=32), "test")
    batch = default_collate([data[i] for i in range(n)])
    mask = torch.zeros(n, 1, 16, 16)
    mask[:, :, 2:10, 4:14] = 1
    return {"caption": batch["caption"], "class_map": batch["class_map"], "image": batch["image"], "mask": mask}


@pytest.mark.parametrize("key", list(SCENE_CONFIGS))
def test_scene_configs_train_and_their_checkpoints_load_and_sample_with_guidance(key, scenes_first_stage, tmp_path):
    from latentdiff.formats.native import load_latent_diffusion

    name, overrides = SCENE_CONFIGS[key]
    out = tmp_path / key
    assert train(out, "train.steps=2", *overrides, config=f"configs/ldm-scenes-{name}.yaml",
                 first_stage=scenes_first_stage) == 0
    weights, state, config = latest(out)
    assert config["model"]["conditioning"] == {"txt2img": "crossattn", "inpaint": "hybrid"}.get(name, "concat")
    assert list(config["model"]["conditioner"]) == ["embedders"]  # a new model saves the embedder list
    conditioner = from_dict(ConditionerConfig, config["model"]["conditioner"])
    text_weights = any(k.startswith("cond_stage_model.") for k in weights)
    if key == "txt2img-minilm":  # the frozen MiniLM is not in the checkpoint, only which weights it was
        assert not text_weights and len(conditioner.minilm.weights_sha256) == 64
    elif name in ("txt2img", "inpaint"):  # the jointly trained encoder is, with its vocabulary in the config
        assert conditioner.text_encoder == "transformer" and text_weights
        assert "sneaker" in conditioner.text.vocab or "bag" in conditioner.text.vocab
    else:
        assert conditioner.text_encoder == "none" and not text_weights
    cache = read_latent_cache(out)
    want_cached = {"txt2img": {"cond.input_ids"}, "seg2img": {"cond.class_map"}, "upscale": {"cond.lowres"},
                   "inpaint": {"cond.input_ids", "cond.image"}}[name]
    if key == "txt2img-minilm":  # a frozen text encoder's states are cached: training never runs it
        want_cached |= {"cond.caption.states", "cond.caption.states_mask"}
    assert {k for k in cache if k.startswith("cond.")} == want_cached
    if name in ("txt2img", "inpaint"):
        captions = (out / "samples" / "captions.txt").read_text().splitlines()
        assert len(captions) == 4 and all(captions)
    model = load_latent_diffusion(out)
    with torch.no_grad():  # weights for the zero-initialised layers, so that the conditioning shows
        for p in model.unet.parameters():
            if float(p.abs().max()) < 1e-2:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    inputs = scene_inputs(2)
    got = model.sample(2, "ddim", 2, torch.Generator().manual_seed(0), cond=inputs, decode=False)
    with torch.no_grad():  # as model.sample: inference kernels (latentdiff.nn.onednn) on both sides
        want = run_sampler(model.denoiser(), (2, 4, 8, 8), model.sigmas(2), "ddim",
                           torch.Generator().manual_seed(0), extra_args=model.encode_conditioning(inputs, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    guidance = 1.0 if name == "upscale" else 3.0  # the upscaler is trained without dropout: no guidance
    guided = model.sample(2, "ddim", 2, torch.Generator().manual_seed(0), cond=inputs, guidance_scale=guidance)
    assert guided.shape == (2, 3, 16, 16) and torch.isfinite(guided).all()


def test_text_model_resume_is_bit_identical(scenes_first_stage, tmp_path):
    common = ["train.device=cpu", *TEXT_TRANSFORMER, "model.conditioner.text_dropout=0.5"]
    config = "configs/ldm-scenes-txt2img.yaml"
    assert train(tmp_path / "full", "train.steps=4", *common, config=config, first_stage=scenes_first_stage) == 0
    part = tmp_path / "part"
    assert train(part, "train.steps=2", *common, config=config, first_stage=scenes_first_stage) == 0
    assert main(["train", "--resume", str(part), "train.steps=4"]) == 0
    (full_w, full_s, full_c), (part_w, part_s, part_c) = latest(tmp_path / "full"), latest(part)
    vocab = from_dict(ConditionerConfig, full_c["model"]["conditioner"]).text.vocab
    assert "sneaker" in vocab or "bag" in vocab
    assert from_dict(ConditionerConfig, part_c["model"]["conditioner"]).text.vocab == vocab
    assert any(k.startswith("cond_stage_model.transformer.") for k in full_w)
    assert full_w.keys() == part_w.keys()
    for k in full_w:
        assert torch.equal(full_w[k], part_w[k]), k
    for group in ("model", "cond_stage_model"):
        for k in full_s[group]:
            assert torch.equal(full_s[group][k], part_s[group][k]), (group, k)
    # The saved conditioner is its EMA; the raw weights are in train_state.
    for name, value in full_s["cond_ema"]["shadow"].items():
        assert torch.equal(full_w[f"cond_stage_model.{name}"], value)
    assert full_s["cond_ema"]["num_updates"] == 4


def test_two_process_ddp_matches_one_process_for_a_jointly_trained_text_encoder(scenes_first_stage, tmp_path):
    """The text encoder's gradients are averaged outside DDP (which wraps the UNet only), and the caption dropout
    is drawn for the global batch: 2 processes x batch 2 end where 1 process x batch 4 does."""
    import os
    import subprocess
    import sys

    common = [*TINY, f"model.first_stage={scenes_first_stage}", "train.steps=3", "train.lr=1e-3", "train.device=cpu",
              *TEXT_TRANSFORMER, "model.conditioner.text_dropout=0.5", "train.sample_every=100"]
    config = "configs/ldm-scenes-txt2img.yaml"
    single = tmp_path / "single"
    assert main(["train", config, *common, "train.batch_size=4", f"train.out_dir={single}"]) == 0
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521", "-m",
         "latentdiff.cli", "train", config, *common, "train.batch_size=2", f"train.out_dir={ddp}"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (_, s1, _), (_, s2, _) = latest(single), latest(ddp)
    for k in s1["cond_stage_model"]:
        torch.testing.assert_close(s1["cond_stage_model"][k], s2["cond_stage_model"][k], rtol=1e-4, atol=1e-5, msg=k)
    # As in the class-model DDP test: per-channel constants before the final GroupNorm (one channel per group
    # here) have no true gradient, so Adam turns rounding noise into steps; the last block's transformer adds one.
    last = max(int(k.split(".")[2]) for k in s1["model"] if k.startswith("diffusion_model.output_blocks."))
    invariant = (f"output_blocks.{last}.0.out_layers.3.bias", f"output_blocks.{last}.0.skip_connection.bias",
                 f"output_blocks.{last}.1.proj_out.bias")
    for k in s1["model"]:
        if not k.endswith(invariant):
            torch.testing.assert_close(s1["model"][k], s2["model"][k], rtol=1e-4, atol=1e-5, msg=k)
