"""Tests of the latent diffusion model on a tiny first stage: scaling, freezing, class dropout, sampling, saving."""

import dataclasses

import pytest
import torch

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.config import to_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.sampling import sample as run_sampler
from latentdiff.diffusion.schedule import ScheduleConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.native import build_latent_diffusion, load_latent_diffusion
from latentdiff.io.checkpoint import save_checkpoint


def tiny_autoencoder_config(regularizer: str = "kl") -> AutoencoderConfig:
    return AutoencoderConfig(regularizer=regularizer, in_channels=1, out_ch=1, resolution=16, ch=16, ch_mult=(1, 2),
                             num_res_blocks=1, z_channels=4, double_z=regularizer == "kl", embed_dim=4,
                             norm_groups=8, n_embed=32)


def tiny_unet(channels: int = 4) -> UNetConfig:
    return UNetConfig(in_channels=channels, out_channels=channels, model_channels=32, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(2,), num_heads=-1, num_head_channels=32,
                      context_dim=None, use_spatial_transformer=False)


@pytest.fixture(scope="module")
def first_stage_path(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_autoencoder_config()
    root = tmp_path_factory.mktemp("ae")
    save_checkpoint(root, 1, Autoencoder(cfg).state_dict(), {"task": "autoencoder", "model": to_dict(cfg)})
    return root


@pytest.fixture(scope="module")
def images():
    data = build_dataset(DataConfig(image_size=16, limit=8), "train")
    return torch.stack([data[i]["image"] for i in range(8)]), torch.tensor([data[i]["label"] for i in range(8)])


def make_model(first_stage_path, **changes) -> LatentDiffusion:
    torch.manual_seed(0)
    cfg = LatentDiffusionConfig(first_stage=str(first_stage_path), image_size=16, channels=1, unet=tiny_unet(),
                                schedule=ScheduleConfig(num_timesteps=50))
    return build_latent_diffusion(dataclasses.replace(cfg, **changes))


def class_model(first_stage_path) -> LatentDiffusion:
    return make_model(first_stage_path, conditioning="class", num_classes=10, scale_factor=0.8)


def randomize_zero_layers(model: LatentDiffusion) -> None:
    """Give the UNet's zero-initialised layers weights: at init its output and label path are exactly zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def test_scale_factor_is_one_over_the_std_of_the_first_latents_and_is_saved(first_stage_path, images, tmp_path):
    model = make_model(first_stage_path)
    x, _ = images
    with pytest.raises(ValueError, match="scale factor is not set"):
        model.encode(x)
    z = model.latents_from_parameters(model.first_stage_parameters(x), torch.Generator().manual_seed(1))
    assert model.set_scale_factor_from(z) == pytest.approx(1 / float(z.std()), rel=1e-6)
    assert model.set_scale_factor_from(z * 5) == pytest.approx(1 / float(z.std()), rel=1e-6)  # computed once
    scaled = model.encode(x, torch.Generator().manual_seed(1))
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-5)
    save_checkpoint(tmp_path, 1, model.state_dict(), {"task": "diffusion", "model": to_dict(model.config)})
    assert load_latent_diffusion(tmp_path).scale_factor == model.scale_factor


def test_encode_decode_shapes_for_kl_vq_and_pixel_space(first_stage_path, images, tmp_path):
    x, _ = images
    model = make_model(first_stage_path, scale_factor=0.5)
    z = model.encode(x)
    assert z.shape == (8, 4, 8, 8) and model.latent_shape == (4, 8, 8)
    assert model.decode(z).shape == x.shape

    vq_cfg = tiny_autoencoder_config("vq")
    save_checkpoint(tmp_path, 1, Autoencoder(vq_cfg).state_dict(), {"task": "autoencoder", "model": to_dict(vq_cfg)})
    vq = make_model(tmp_path, scale_factor=1.0)
    zq = vq.encode(x)
    assert zq.shape == (8, 4, 8, 8) and vq.decode(zq + 0.01).shape == x.shape
    # A VQ latent is already a code: sampling from it adds no randomness.
    assert torch.equal(vq.latents_from_parameters(zq, torch.Generator()), zq)

    pixel = LatentDiffusion(LatentDiffusionConfig(image_size=16, channels=1, unet=tiny_unet(1),
                                                  schedule=ScheduleConfig(num_timesteps=50)))
    assert pixel.pixel_space and pixel.scale_factor == 1.0 and pixel.latent_shape == (1, 16, 16)
    assert torch.equal(pixel.encode(x), x) and torch.equal(pixel.decode(x), x)
    assert all(k.startswith("model.diffusion_model.") for k in pixel.state_dict())


def test_loss_is_finite_and_only_the_unet_gets_gradients(first_stage_path, images):
    model = make_model(first_stage_path, scale_factor=0.5).train()
    assert not model.first_stage_model.training  # frozen: stays in eval mode
    x, _ = images
    loss, logs = model.loss(model.encode(x, torch.Generator().manual_seed(0)), None, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and {"loss", "loss_simple", "loss_vlb"} <= set(logs)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.first_stage_model.parameters())
    grads = [p.grad for p in model.unet.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.unet.parameters()}


def test_class_dropout_replaces_labels_with_the_null_class_at_its_rate(first_stage_path):
    model = make_model(first_stage_path, conditioning="class", num_classes=10, class_dropout=0.25)
    assert model.unet.config.num_classes == 11 and model.null_class == 10
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = model.drop_class_labels(y, torch.Generator().manual_seed(3))
    is_null = dropped == 10
    assert abs(float(is_null.float().mean()) - 0.25) < 0.01
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(dropped, model.drop_class_labels(y, torch.Generator().manual_seed(3)))  # seeded
    model.config.class_dropout = 0.0
    assert torch.equal(model.drop_class_labels(y, torch.Generator()), y)


def test_save_load_round_trip_gives_identical_samples_and_compvis_names(first_stage_path, tmp_path):
    model = class_model(first_stage_path)
    randomize_zero_layers(model)
    config = {"task": "diffusion", "model": to_dict(model.config)}
    save_checkpoint(tmp_path, 3, model.state_dict(), config)
    loaded = load_latent_diffusion(tmp_path)
    keys = list(loaded.state_dict())
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    assert "model.diffusion_model.label_emb.weight" in keys
    cond = {"y": torch.tensor([0, 3, 10])}
    a = model.sample(3, "euler_ancestral", 3, torch.Generator().manual_seed(7), cond=cond, guidance_scale=2.0)
    b = loaded.sample(3, "euler_ancestral", 3, torch.Generator().manual_seed(7), cond=cond, guidance_scale=2.0)
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_guidance_one_is_the_plain_conditional_model(first_stage_path):
    model = class_model(first_stage_path)
    randomize_zero_layers(model)
    y = torch.tensor([1, 2])
    got = model.sample(2, "ddim", 4, torch.Generator().manual_seed(0), cond={"y": y}, guidance_scale=1.0,
                       decode=False)
    want = run_sampler(model.denoiser(), (2, 4, 8, 8), model.sigmas(4), "ddim", torch.Generator().manual_seed(0),
                       extra_args={"y": y})
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    guided = model.sample(2, "ddim", 4, torch.Generator().manual_seed(0), cond={"y": y}, guidance_scale=3.0,
                          decode=False)
    assert not torch.allclose(guided, got)


def test_same_seed_same_images_other_seed_other_images(first_stage_path):
    model = make_model(first_stage_path, scale_factor=0.7)
    randomize_zero_layers(model)
    a = model.sample(2, "dpmpp_2m", 3, torch.Generator().manual_seed(5))
    b = model.sample(2, "dpmpp_2m", 3, torch.Generator().manual_seed(5))
    c = model.sample(2, "dpmpp_2m", 3, torch.Generator().manual_seed(6), karras=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_conditioning_errors_are_clear(first_stage_path):
    model = make_model(first_stage_path, scale_factor=0.7)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(1, "ddim", 2, cond={"y": torch.tensor([1])})
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        model.sample(1, "ddim", 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.sample(1, "nope", 2)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        class_model(first_stage_path).sample(1, "ddim", 2, cond={"y": torch.tensor([11])})


@pytest.mark.parametrize("changes,message", [
    ({"unet": tiny_unet(3)}, r"in_channels \(3\) and out_channels must equal the first stage's embed_dim \(4\)"),
    ({"conditioning": "class"}, "needs model.num_classes"),
    ({"conditioning": "text"}, "unknown conditioning"),
    ({"unet": dataclasses.replace(tiny_unet(), num_classes=5)}, "conditioning is 'none'"),
    ({"unet": dataclasses.replace(tiny_unet(), context_dim=8, use_spatial_transformer=True)}, "context_dim"),
    ({"image_size": 10}, "must be divisible by 4"),
])
def test_config_mismatches_give_clear_errors(first_stage_path, changes, message):
    with pytest.raises(ValueError, match=message):
        make_model(first_stage_path, **changes)
