"""Our UNet and VAE compute what diffusers' UNet2DConditionModel and AutoencoderKL compute, given the same weights.

Each test builds the diffusers model from a config written the way diffusers writes it, with seeded random
weights, maps its config and state dict to ours (``latentdiff.formats.diffusers_names``), loads them into our model and
compares the outputs: max |ours - diffusers| / max |diffusers| <= 1e-4 in float32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.diffusion.unet import UNetConfig, UNetModel
from latentdiff.formats.diffusers_names import (
    unet_config_from_diffusers,
    unet_from_diffusers,
    vae_config_from_diffusers,
    vae_from_diffusers,
)
from latentdiff.nn import cpu_attention, winograd

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-4

TWO_LEVELS_V1 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' name for the head count of SD v1
)
OURS_V1 = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                     attention_resolutions=(2, 1), num_heads=2, num_head_channels=-1, transformer_depth=1,
                     context_dim=32, use_linear_in_transformer=False)

UNET_CASES = {
    # SD v1 style: 1x1-conv projections, a fixed head count.
    "v1_conv_proj_num_heads": (TWO_LEVELS_V1, OURS_V1),
    # SD v2 style: linear projections, heads of a fixed width (16 here; 64 in SD v2), listed per level.
    "v2_linear_proj_head_width": (
        dict(TWO_LEVELS_V1, use_linear_projection=True, attention_head_dim=(2, 4)),
        dataclasses.replace(OURS_V1, use_linear_in_transformer=True, num_heads=-1, num_head_channels=16)),
    # SD inpainting: 9 input channels (latent, masked-image latent, mask).
    "inpainting_9_channels": (dict(TWO_LEVELS_V1, in_channels=9), dataclasses.replace(OURS_V1, in_channels=9)),
    # SD's pattern on three levels: no attention at the coarsest level, two transformer layers per block.
    "three_levels_last_without_attention_depth2": (
        dict(TWO_LEVELS_V1, block_out_channels=(32, 64, 64), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             transformer_layers_per_block=2),
        dataclasses.replace(OURS_V1, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=2)),
    # Class labels and FiLM (scale-shift) ResBlocks.
    "class_labels_scale_shift": (
        dict(TWO_LEVELS_V1, num_class_embeds=5, resnet_time_scale_shift="scale_shift"),
        dataclasses.replace(OURS_V1, num_classes=5, use_scale_shift_norm=True)),
}


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so that no layer is left at an all-zero or all-one init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def winograd_everywhere(monkeypatch) -> list[int]:
    """Every fp32 3x3 convolution through Winograd's F(4x4, 3x3) (latentdiff/nn/winograd.py), which these small
    shapes would otherwise leave to oneDNN's direct convolution; returns the list its calls are counted in."""
    if winograd._load() is None:
        pytest.skip("no C compiler here: Winograd's transforms cannot be built")
    for name in ("MIN_CHANNELS", "MIN_TILES", "MIN_WORK"):
        monkeypatch.setattr(winograd, name, 0)
    calls: list[int] = []
    convolve = winograd.convolve
    monkeypatch.setattr(winograd, "convolve", lambda *a: calls.append(1) or convolve(*a))
    return calls


@pytest.mark.parametrize("kernel", ["default", "attention", "winograd"],
                         ids=["kernels-at-this-size", "our-cpu-attention", "winograd-everywhere"])
@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_matches_diffusers(case: str, kernel: str, monkeypatch) -> None:
    """Also with every attention call through our CPU kernel (latentdiff/nn/cpu_attention.py), and with every 3x3
    convolution through Winograd's transforms, which these small shapes would otherwise leave to SDPA and oneDNN."""
    calls = winograd_everywhere(monkeypatch) if kernel == "winograd" else []
    if kernel == "attention":
        if not cpu_attention._FP32_OK or cpu_attention._compiler() is None:
            pytest.skip("no AVX-512 here: the CPU attention kernel does not apply")
        attend = cpu_attention.attend
        monkeypatch.setattr(cpu_attention, "MIN_WORK", 0)
        monkeypatch.setattr(cpu_attention, "attend", lambda *a: calls.append(1) or attend(*a))
    kwargs, expected_config = UNET_CASES[case]
    torch.manual_seed(0)
    theirs = perturb_(diffusers.UNet2DConditionModel(**kwargs), seed=1)
    config = unet_config_from_diffusers(dict(theirs.config))
    assert config == expected_config
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), config), strict=True)

    g = torch.Generator().manual_seed(2)
    size = 8 * config.downsample_factor // 2
    x = torch.randn(2, config.in_channels, size, size, generator=g)
    t = torch.tensor([17, 803])
    context = torch.randn(2, 7, config.context_dim, generator=g)
    labels = torch.tensor([1, 4]) if config.num_classes else None
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, class_labels=labels).sample
        if config.in_channels == 9:  # the inpainting channels may also arrive as ``concat``
            got = ours(x[:, :4], t, context=context, concat=x[:, 4:])
        else:
            got = ours(x, t, context=context, y=labels)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= RTOL
    assert bool(calls) == (kernel != "default")


VAE_KWARGS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=2,
                  latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.3)
OURS_VAE = AutoencoderConfig(regularizer="kl", in_channels=3, out_ch=3, resolution=32, ch=32, ch_mult=(1, 2, 2),
                             num_res_blocks=2, attn_resolutions=(), z_channels=4, double_z=True, embed_dim=4)


@pytest.fixture(scope="module")
def vae_pair() -> tuple[torch.nn.Module, Autoencoder]:
    torch.manual_seed(0)
    theirs = perturb_(diffusers.AutoencoderKL(**VAE_KWARGS), seed=3)
    config, scale = vae_config_from_diffusers(dict(theirs.config))
    assert config == OURS_VAE and scale == 0.3
    ours = Autoencoder(config).eval()
    ours.load_state_dict(vae_from_diffusers(theirs.state_dict(), config), strict=True)
    return theirs, ours


def test_vae_encode_matches_diffusers(vae_pair) -> None:
    theirs, ours = vae_pair
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = theirs.encode(x).latent_dist
        posterior = ours.encode(x)
    assert posterior.mean.shape == (2, 4, 8, 8)
    assert relative_error(posterior.mean, expected.mean) <= RTOL
    assert relative_error(posterior.logvar, expected.logvar) <= RTOL


@pytest.mark.parametrize("kernel", ["default", "winograd"], ids=["kernels-at-this-size", "winograd-everywhere"])
def test_vae_decode_matches_diffusers(vae_pair, kernel: str, monkeypatch) -> None:
    theirs, ours = vae_pair
    calls = winograd_everywhere(monkeypatch) if kernel == "winograd" else []
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 32, 32)
    assert relative_error(got, expected) <= RTOL
    assert bool(calls) == (kernel == "winograd")


# The UNet configs of the published diffusers repositories (unet/config.json), trimmed to the fields they set.
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                 sample_size=96, upcast_attention=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_unet_matches_diffusers(name: str) -> None:
    """Stable Diffusion's 860M-parameter UNet on random weights, at 32x32 latents (about 4 GB of memory)."""
    cases = {"sd15": (SD15_UNET, UNetConfig.sd_v1()), "sd21": (SD21_UNET, UNetConfig.sd_v2())}
    diffusers_config, expected = cases[name]
    config = unet_config_from_diffusers(diffusers_config)
    assert config == expected
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config).eval()
    with torch.device("meta"):
        ours = UNetModel(config)
    # assign=True shares the tensors instead of copying them: one set of weights in memory.
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), config), strict=True, assign=True)
    ours.eval()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, config.context_dim, generator=g)
    with torch.no_grad():
        expected_out = theirs(x, torch.tensor([500]), encoder_hidden_states=context).sample
        got = ours(x, torch.tensor([500]), context=context)
    assert relative_error(got, expected_out) <= RTOL
