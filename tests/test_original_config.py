"""A single file's original YAML (CompVis keys) supplies what the shapes cannot: heads, text activation, v."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_sd_pipeline import UNET, tiny_components

from latentdiff import cli
from latentdiff.formats import load_stable_diffusion_weights, save_original, to_original_state_dict
from latentdiff.formats.original_config import read_original_config
from latentdiff.io.errors import CheckpointError
from latentdiff.pipelines import load_pipeline

pytest.importorskip("transformers")


def compvis_yaml(path: Path, **model_params) -> Path:
    """A v1-inference.yaml in small: 2 heads (SD's convention would guess 8), OpenAI CLIP (quick-GELU)."""
    params = {"scale_factor": 0.18215, "unet_config": {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {"model_channels": 32, "num_heads": 2, "context_dim": 32, "use_spatial_transformer": True,
                   "transformer_depth": 1, "use_checkpoint": True, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {"resolution": 32}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}, **model_params}
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                              "params": params}}))
    return path


@pytest.fixture(scope="module")
def bare_file(tmp_path_factory) -> tuple[Path, Path]:
    """(the file without our configs in its metadata, as published files are; the same weights with them)."""
    root = tmp_path_factory.mktemp("original_config")
    comps = tiny_components(UNET, seed=50)
    bare = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_original_state_dict(comps).items()}, str(bare))
    # CompVis' config names its text encoder (OpenAI's CLIP ViT-L, 64-wide heads) rather than its heads: so does ours.
    comps.text_encoder_config = dict(comps.text_encoder_config, num_attention_heads=1)
    return bare, save_original(comps, root / "with_metadata.safetensors")


def test_without_yaml_heads_are_guessed_with_one_warning(bare_file, caplog) -> None:
    bare, _ = bare_file
    with caplog.at_level(logging.WARNING):
        comps = load_stable_diffusion_weights(bare)
    assert comps.unet_config.num_heads == 8 and comps.unet_config != UNET  # SD's convention: wrong for this model
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "attention heads" in warnings[0] and "--config" in warnings[0]


def test_yaml_beside_the_file_or_given_is_read(bare_file, tmp_path: Path, caplog) -> None:
    bare, reference = bare_file
    beside = tmp_path / "model.safetensors"
    beside.write_bytes(bare.read_bytes())
    compvis_yaml(tmp_path / "model.yaml")
    with caplog.at_level(logging.WARNING):
        comps = load_stable_diffusion_weights(beside)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert comps.unet_config == UNET and comps.vae_config.resolution == 32
    assert comps.text_encoder_config["hidden_act"] == "quick_gelu"  # the shapes would say gelu (not 768 wide)
    assert comps.prediction_type == "epsilon"
    # The images are the ones of the file that stores its true configs; without the YAML they are not.
    def latents(path: Path) -> torch.Tensor:
        pipe = load_pipeline(path)
        return pipe.text_to_image("a cat", steps=2, sampler="ddim", generator=0, height=32, width=32).latents

    want = latents(reference)
    assert torch.equal(latents(beside), want)
    assert float((latents(bare) - want).abs().max()) > 1e-3
    # --config names another file; v-prediction and the penultimate layer of an OpenCLIP text encoder.
    v = compvis_yaml(tmp_path / "v.yaml", parameterization="v", cond_stage_config={
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"layer": "penultimate"}})
    comps = load_pipeline(bare, config=v)
    assert comps.prediction_type == "v_prediction" and comps.text_encoder.config.output_layer == "penultimate"
    assert comps.text_encoder.config.activation == "gelu"


def test_convert_reads_the_yaml_and_bad_files_are_one_line(bare_file, tmp_path: Path, capsys) -> None:
    bare, _ = bare_file
    config = compvis_yaml(tmp_path / "c.yaml")
    assert cli.main(["convert", str(bare), str(tmp_path / "out.safetensors"), "--to", "original", "--config",
                     str(config)]) == 0
    assert load_stable_diffusion_weights(tmp_path / "out.safetensors").unet_config == UNET  # stored from the YAML
    (tmp_path / "bad.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="no model.params"):
        read_original_config(tmp_path / "bad.yaml")
    capsys.readouterr()
    code = cli.main(["generate", "a cat", "--model", str(bare), "--config", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "config file not found" in err[0]
