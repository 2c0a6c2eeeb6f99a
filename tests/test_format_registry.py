"""The checkpoint format registry: detection of each format (and a clear refusal of what is none), a round trip
through every reader / writer pair, and a format added in a test with no other edit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.cli import build_parser
from latentdiff.conditioning.clip import CLIPTextConfig, CLIPTextModel
from latentdiff.config import from_dict, to_dict
from latentdiff.diffusion.unet import UNetConfig, UNetModel
from latentdiff.formats import (
    FORMATS,
    CheckpointFormat,
    ReadOptions,
    StableDiffusionComponents,
    convert,
    detect_format,
    read_components,
    writable_formats,
    write_components,
)
from latentdiff.formats.stable_diffusion import to_original_state_dict
from latentdiff.io.errors import CheckpointError

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2, 1), num_heads=2, num_head_channels=-1, context_dim=32)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=32)
CLIP = CLIPTextConfig(width=32, layers=2, heads=2, mlp_width=64, activation="quick_gelu")
# Where each writable format puts a model, and the name detection gives it back.
TARGETS = {"native": "run", "original": "model.safetensors", "diffusers": "pipeline"}


@pytest.fixture(scope="module")
def comps() -> StableDiffusionComponents:
    """A tiny SD v1-shaped model: UNet with a 32-wide context, KL VAE, CLIP text encoder."""
    torch.manual_seed(0)
    hf = dict(CLIP.to_hf(), architectures=["CLIPTextModel"], model_type="clip_text_model")
    return StableDiffusionComponents(unet=UNetModel(UNET).state_dict(), unet_config=UNET,
                                     vae=Autoencoder(VAE).state_dict(), vae_config=VAE,
                                     text_encoder=CLIPTextModel(CLIP).state_dict(), text_encoder_layout="hf",
                                     text_encoder_config=hf, image_size=64)


def assert_same_model(a: StableDiffusionComponents, b: StableDiffusionComponents,
                      parts: tuple[str, ...] = ("unet", "vae", "text_encoder"), configs: bool = True) -> None:
    """The same weights in ``parts`` and, with ``configs``, the same UNet and VAE configs."""
    for part in parts:
        left, right = getattr(a, part), getattr(b, part)
        assert sorted(left) == sorted(right), part
        assert all(torch.equal(left[k], right[k]) for k in left), part
        if configs and part in ("unet", "vae"):
            assert getattr(a, f"{part}_config") == getattr(b, f"{part}_config"), part


def test_each_format_is_detected(tmp_path: Path, comps: StableDiffusionComponents) -> None:
    for name, target in TARGETS.items():
        write_components(comps, tmp_path / target, name)
    assert detect_format(tmp_path / "run") == "native"  # a run folder, its checkpoint folder and file
    step = tmp_path / "run" / "checkpoints" / "step_0000000"
    assert detect_format(step) == detect_format(step / "model.safetensors") == "native"
    assert detect_format(tmp_path / "model.safetensors") == "original"
    assert detect_format(tmp_path / "pipeline") == "diffusers"
    for part in ("unet", "vae", "text_encoder"):  # each model folder of a pipeline is a component
        assert detect_format(tmp_path / "pipeline" / part) == "component"
    assert detect_format(tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors") == "component"
    torch.save({"state_dict": to_original_state_dict(comps)}, tmp_path / "model.ckpt")
    assert detect_format(tmp_path / "model.ckpt") == "ckpt"


def test_what_is_no_format_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "notes.txt", tmp_path / "empty"):
        with pytest.raises(CheckpointError, match=r"not a checkpoint in a format read here \(native: .*; ckpt: "):
            detect_format(path)
        with pytest.raises(CheckpointError, match="not a checkpoint in a format read here"):
            read_components(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        detect_format(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown format 'onnx'; choose one of native, original, diffusers"):
        write_components(StableDiffusionComponents(), tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="unknown format 'ckpt'"):  # read only
        write_components(StableDiffusionComponents(), tmp_path / "x", "ckpt")
    with pytest.raises(TypeError):  # a misspelt read option is not silently ignored
        read_components(tmp_path / "notes.txt", format="original", emma=False)


def test_round_trip_through_every_reader_and_writer(tmp_path: Path, comps: StableDiffusionComponents) -> None:
    """Each writer's output, read back through the registry, is the model written; each reader's components
    written by every writer and read again are the same model."""
    assert writable_formats() == ("native", "original", "diffusers")
    for writer, target in TARGETS.items():
        written = tmp_path / writer / target
        write_components(comps, written, writer)
        assert detect_format(written) == writer
        first = read_components(written)
        assert_same_model(first, comps)
        for again, again_target in TARGETS.items():
            second = tmp_path / writer / f"then_{again}" / again_target
            write_components(first, second, again)
            assert_same_model(read_components(second), comps)
    # The read-only formats: a pickled single file and the components of a pipeline folder.
    torch.save({"state_dict": to_original_state_dict(comps)}, tmp_path / "model.ckpt")
    # A pickle carries no config: heads and the VAE's resolution follow SD's (8 heads, 256), the rest the shapes.
    from_pickle = read_components(tmp_path / "model.ckpt")
    assert_same_model(from_pickle, comps, configs=False)
    assert from_pickle.unet_config == dataclasses.replace(UNET, num_heads=8)
    assert from_pickle.vae_config == dataclasses.replace(VAE, resolution=256)
    pipeline = tmp_path / "diffusers" / "pipeline"
    for part in ("unet", "vae", "text_encoder"):
        assert_same_model(read_components(pipeline / part, "component"), comps, (part,))
    # A VAE alone is written to diffusers as a component folder, as diffusers publishes its VAEs.
    vae_only = dataclasses.replace(comps, unet=None, unet_config=None, text_encoder=None)
    write_components(vae_only, tmp_path / "vae", "diffusers")
    assert detect_format(tmp_path / "vae") == "component"
    assert_same_model(read_components(tmp_path / "vae"), comps, ("vae",))


# ------------------------------------------------------------------------------------------ a new format


def _detect_toy(path: Path) -> bool:
    return path.is_file() and path.suffix == ".toy"


def _read_toy(path: Path, options: ReadOptions) -> StableDiffusionComponents:
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["unet_config"])
    return StableDiffusionComponents(unet=load_file(str(path)), unet_config=from_dict(UNetConfig, config),
                                     source="toy")


def _write_toy(comps: StableDiffusionComponents, path: Path) -> Path:
    save_file(comps.unet, str(path), metadata={"unet_config": json.dumps(to_dict(comps.unet_config))})
    return path


TOY = CheckpointFormat("toy", "a UNet alone with its config in the metadata (.toy)", _detect_toy, _read_toy,
                       _write_toy)


def test_a_new_format_is_one_registry_entry(tmp_path: Path, comps: StableDiffusionComponents, monkeypatch,
                                            capsys) -> None:
    monkeypatch.setitem(FORMATS, "toy", TOY)
    assert writable_formats()[-1] == "toy"
    toy = write_components(comps, tmp_path / "unet.toy", "toy")
    assert detect_format(toy) == "toy"
    assert_same_model(read_components(toy), comps, ("unet",))
    original = convert(toy, tmp_path / "unet.safetensors", "original")  # read through the new format
    assert_same_model(read_components(original), comps, ("unet",))
    args = build_parser().parse_args(["convert", str(original), str(tmp_path / "again.toy"), "--to", "toy"])
    args.func(args)  # the command line offers it too
    assert "wrote toy checkpoint" in capsys.readouterr().out
    assert_same_model(read_components(tmp_path / "again.toy"), comps, ("unet",))
