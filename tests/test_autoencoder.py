"""Tests of the first-stage model: architecture, names, KL posterior, quantiser, discriminator, adaptive weight."""

import math

import pytest
import torch
from torch import nn

from latentdiff.autoencoder.discriminator import NLayerDiscriminator, discriminator_loss, generator_loss
from latentdiff.autoencoder.distributions import DiagonalGaussian
from latentdiff.autoencoder.losses import AutoencoderLoss, AutoencoderLossConfig, adaptive_weight
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.autoencoder.quantize import VectorQuantizer
from latentdiff.config import load_config, read_yaml
from latentdiff.formats.native import load_autoencoder
from latentdiff.io.checkpoint import save_checkpoint
from latentdiff.io.errors import CheckpointError


def tiny(regularizer="kl", ch_mult=(1, 2), **kw):
    base = dict(regularizer=regularizer, in_channels=3, out_ch=3, resolution=32, ch=32, ch_mult=ch_mult,
                num_res_blocks=1, attn_resolutions=(16,), z_channels=4, embed_dim=4, norm_groups=8)
    if regularizer == "vq":
        base.update(double_z=False, n_embed=64)
    base.update(kw)
    return AutoencoderConfig(**base)


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_shapes_for_every_downsampling_factor(f, regularizer):
    ch_mult = tuple([1] + [2] * int(math.log2(f)))
    model = Autoencoder(tiny(regularizer, ch_mult, num_res_blocks=1, attn_resolutions=(), ch=16))
    assert model.downsample_factor == f
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.latent.shape == (2, 4, 32 // f, 32 // f)
    assert out.reconstruction.shape == x.shape
    assert model.decode(out.latent).shape == x.shape
    z = model.encode(x)
    latent = z.mode() if regularizer == "kl" else z
    assert latent.shape == (2, 4, 32 // f, 32 // f)


def test_non_divisible_input_and_wrong_channels_are_clear_errors():
    model = Autoencoder(tiny(ch_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="expected latents"):
        model.decode(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_mask_decoder_starts_as_the_plain_decoder_and_never_sees_the_masked_pixels(regularizer):
    torch.manual_seed(0)
    model = Autoencoder(tiny(regularizer, ch_mult=(1, 2, 2), mask_decoder=True)).eval()
    for k, v in model.decoder.state_dict().items():  # as train_only: mask_decoder initialises it
        model.mask_decoder.decoder.state_dict()[k].copy_(v)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        plain = model.decode(z)
        assert torch.equal(model.decode_masked(z, x, mask), plain)  # zero-initialised: exactly the plain decoder
        for out in model.mask_decoder.cond_out:
            torch.nn.init.normal_(out.weight, std=0.1)
        masked = model.decode_masked(z, x, mask)
        assert (masked - plain).abs().mean() > 1e-3  # now the known pixels matter ...
        changed = x.clone()
        changed[:, :, 8:24, 4:20] = torch.rand(2, 3, 16, 16)  # ... but not the ones under the mask
        assert torch.equal(model.decode_masked(z, changed, mask), masked)
        assert torch.equal(model(x, sample_posterior=False, mask=mask).reconstruction,
                           model.decode_masked(model(x, sample_posterior=False).latent, x, mask))
    with pytest.raises(ValueError, match=r"need images \(2, 3, 32, 32\) and masks \(2, 1, 32, 32\)"):
        model.decode_masked(z, x, mask[:, :, :16])
    with pytest.raises(ValueError, match="has no mask-conditioned decoder"):
        Autoencoder(tiny(regularizer)).decode_masked(z, x, mask)


def test_sd_kl_f8_config_has_the_original_names_and_size():
    data = read_yaml("configs/sd-kl-f8.yaml")
    from latentdiff.train.autoencoder import AutoencoderExperiment

    exp = load_config(AutoencoderExperiment, data)
    model = Autoencoder(exp.model)
    sd = model.state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "encoder.down.3.downsample.conv.weight" not in sd  # no downsample after the last level
    # The released SD v1 VAE (first_stage_model.*) has 248 tensors and 83,653,863 parameters.
    assert len(sd) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


@pytest.mark.parametrize("name,n_embed,dim,f", [("ldm-vq-f4", 8192, 3, 4), ("ldm-vq-f8", 16384, 4, 8)])
def test_ldm_vq_configs_are_expressible(name, n_embed, dim, f):
    from latentdiff.train.autoencoder import AutoencoderExperiment

    exp = load_config(AutoencoderExperiment, read_yaml(f"configs/{name}.yaml"))
    assert (exp.model.n_embed, exp.model.embed_dim, exp.model.downsample_factor) == (n_embed, dim, f)
    model = Autoencoder(exp.model)
    assert model.quantize.embedding.weight.shape == (n_embed, dim)


def test_kl_and_its_gradient_match_the_closed_form():
    torch.manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    logvar = (0.5 * torch.randn(3, 2, 4, 4, dtype=torch.float64)).requires_grad_(True)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    kl = post.kl()
    expected = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    torch.testing.assert_close(mean.grad, mean.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1))
    # A standard normal posterior has zero KL; the Monte-Carlo KL agrees with the closed form.
    zero = DiagonalGaussian(torch.zeros(2, 4, 3, 3))
    assert torch.allclose(zero.kl(), torch.zeros(2))
    p = DiagonalGaussian(torch.cat([torch.full((1, 1, 1, 1), 0.7), torch.full((1, 1, 1, 1), -0.4)], 1).double())
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([p.sample(g) for _ in range(20000)])
    # KL = E_q[log q(z) - log N(z; 0, 1)], estimated with q's own nll.
    log_q = -p.nll(samples.view(-1, 1, 1, 1))
    log_prior = -0.5 * (samples.view(-1) ** 2 + math.log(2 * math.pi))
    mc = (log_q - log_prior).mean()
    assert abs(float(mc) - float(p.kl())) < 0.02


def test_logvar_is_clamped_and_sampling_is_reproducible():
    params = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 100.0)], dim=1)
    post = DiagonalGaussian(params)
    assert float(post.logvar.max()) == 20.0
    params = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -100.0)], dim=1)
    assert float(DiagonalGaussian(params).logvar.min()) == -30.0
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(post.mode(), post.mean)


def test_quantizer_picks_nearest_codes_and_counts_usage():
    vq = VectorQuantizer(n_embed=4, embed_dim=2, restart_dead_codes=False)
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    vq.embedding.weight.data.copy_(codes)
    # 4 vectors near code 1, 2 near code 2, 2 near code 0; code 3 unused.
    z = torch.tensor([[0.9, 0.1], [1.1, 0.0], [1.0, -0.1], [0.8, 0.0], [0.1, 0.9], [0.0, 1.2], [0.1, 0.1],
                      [-0.1, 0.0]])
    z = z.t().reshape(1, 2, 2, 4)
    out = vq(z)
    assert out.indices.flatten().tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    assert float(out.usage) == 0.75
    probs = torch.tensor([0.25, 0.5, 0.25])
    assert float(out.perplexity) == pytest.approx(float(torch.exp(-(probs * probs.log()).sum())), rel=1e-6)
    torch.testing.assert_close(out.quantized, codes[out.indices.flatten()].t().reshape(1, 2, 2, 4))


def test_quantizer_straight_through_gradients_and_losses():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=16, embed_dim=3, beta=0.25, restart_dead_codes=False)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity through the quantiser
    # loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (means); its gradient w.r.t. z is beta * 2(z - e)/numel
    z2 = z.detach().clone().requires_grad_(True)
    vq.embedding.weight.grad = None
    out2 = vq(z2)
    out2.loss.backward()
    e = out2.quantized.detach()
    torch.testing.assert_close(z2.grad, 0.25 * 2 * (z2.detach() - e) / z2.numel())
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0
    expected_loss = 1.25 * ((z.detach() - e) ** 2).mean()
    torch.testing.assert_close(out2.loss.detach(), expected_loss)


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=8, embed_dim=2, restart_every=10, dead_code_threshold=0.5, usage_decay=0.5)
    vq.embedding.weight.data.copy_(torch.tensor([[0.0, 0.0]] + [[100.0 + i, 100.0] for i in range(7)]))
    vq.train()
    data = torch.randn(4, 2, 8, 8) * 0.5 + 3.0  # every vector is nearest to code 0 at first
    first = vq(data)
    assert float(first.usage) == 1 / 8
    for _ in range(10):
        vq(data)
    out = vq(data)
    # The restarted codes now sit among the data and get used.
    assert float(out.usage) > 0.5
    assert float(vq.embedding.weight.data[1:].abs().max()) < 10


def test_ema_codebook_moves_to_the_mean_of_its_vectors():
    vq = VectorQuantizer(n_embed=2, embed_dim=2, ema=True, ema_decay=0.5, restart_dead_codes=False)
    vq.embedding.weight.data.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.ema_embed_sum.copy_(vq.embedding.weight.data)
    vq.ema_cluster_size.fill_(1.0)
    assert not vq.embedding.weight.requires_grad
    z = torch.tensor([[1.0, 1.0], [1.0, 1.0], [9.0, 9.0], [9.0, 9.0]]).t().reshape(1, 2, 2, 2)
    vq.train()
    for _ in range(30):
        out = vq(z)
    torch.testing.assert_close(vq.embedding.weight.data, torch.tensor([[1.0, 1.0], [9.0, 9.0]]), atol=1e-3,
                               rtol=1e-3)
    # With EMA updates only the commitment term remains in the loss.
    assert float(out.loss) == pytest.approx(0.25 * float(((z - out.quantized.detach()) ** 2).mean()), abs=1e-6)


def test_discriminator_gives_patch_logits():
    d = NLayerDiscriminator(in_channels=3, ndf=16, n_layers=3)
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # the 70x70 PatchGAN
    d2 = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2)
    assert d2(torch.randn(4, 1, 32, 32)).shape == (4, 1, 6, 6)
    assert d.main[0].weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_gan_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert float(discriminator_loss(real, fake, "non_saturating")) == pytest.approx(float(expected))
    assert float(generator_loss(fake, "hinge")) == pytest.approx(1.0)
    assert float(generator_loss(fake, "non_saturating")) == pytest.approx(float(sp(-fake).mean()))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(fake, "wasserstein")


def test_adaptive_weight_against_a_hand_computation():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x, target, v = torch.randn(3), torch.randn(2), torch.randn(2)
    out = layer(x)
    rec = ((out - target) ** 2).sum()
    gan = -(v * out).sum()
    w = layer.weight.detach()
    rec_grad = 2 * torch.outer(w @ x - target, x)  # d rec / dW
    gan_grad = -torch.outer(v, x)  # d gan / dW
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4) * 0.5
    got = adaptive_weight(rec, gan, layer.weight, disc_weight=0.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert not got.requires_grad
    # A GAN loss with no gradient at the last layer hits the 1e4 clamp.
    out = layer(x)
    rec = ((out - target) ** 2).sum()
    gan = 0.0 * out.sum()
    assert float(adaptive_weight(rec, gan, layer.weight, 1.0)) == 1e4


def test_loss_switches_on_the_gan_at_disc_start_and_trains_both_players():
    torch.manual_seed(0)
    model = Autoencoder(tiny(ch_mult=(1, 2)))
    cfg = AutoencoderLossConfig(perceptual="none", disc_start=5, disc_weight=0.5, disc_ndf=8, disc_layers=2)
    loss_fn = AutoencoderLoss(cfg, image_channels=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    before, logs = loss_fn.generator_loss(x, out.reconstruction, out.reg_loss, 4, model.last_layer, "kl")
    assert "g_loss" not in logs
    pixel = (x - out.reconstruction).abs().mean()
    torch.testing.assert_close(before, pixel + 1e-6 * out.reg_loss / x[0].numel())
    after, logs = loss_fn.generator_loss(x, out.reconstruction, out.reg_loss, 5, model.last_layer, "kl")
    assert "g_loss" in logs and float(logs["d_weight"]) > 0
    torch.testing.assert_close(after, before + logs["d_weight"] * logs["g_loss"])
    d_loss, d_logs = loss_fn.discriminator_step_loss(x, out.reconstruction)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    off = AutoencoderLoss(AutoencoderLossConfig(perceptual="none", disc_weight=0.0), 3)
    assert off.discriminator is None and not off.gan_active(10**6)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    for reg in ("kl", "vq"):
        cfg = tiny(reg)
        model = Autoencoder(cfg).eval()
        from latentdiff.config import to_dict

        save_checkpoint(tmp_path / reg, 7, model.state_dict(), {"task": "autoencoder", "model": to_dict(cfg)})
        loaded = load_autoencoder(tmp_path / reg)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            a, b = model(x, sample_posterior=False), loaded(x, sample_posterior=False)
        assert torch.equal(a.reconstruction, b.reconstruction)
        assert torch.equal(a.latent, b.latent)


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    from latentdiff.config import to_dict

    model = Autoencoder(tiny())
    weights = model.state_dict()
    weights.pop("decoder.conv_out.bias")
    weights["extra.weight"] = torch.zeros(1)
    weights["quant_conv.weight"] = torch.zeros(2, 2, 1, 1)
    save_checkpoint(tmp_path / "bad", 1, weights, {"task": "autoencoder", "model": to_dict(tiny())})
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(tmp_path / "bad")
    msg = str(err.value)
    assert "decoder.conv_out.bias" in msg and "extra.weight" in msg and "quant_conv.weight" in msg
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_autoencoder(tmp_path / "garbage.safetensors")
    save_checkpoint(tmp_path / "other", 1, model.state_dict(), {"task": "diffusion", "model": {}})
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        load_autoencoder(tmp_path / "other")


def test_checkpoints_are_pruned_and_latest_points_at_the_newest(tmp_path):
    model = Autoencoder(tiny())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model.state_dict(), {"task": "autoencoder", "model": {}}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"
