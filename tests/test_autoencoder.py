"""KL autoencoder (first stage): parameter counts, parity with diffusers.AutoencoderKL, weight
conversion, posterior math, identity first stage, checkpoint loading and config validation."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from trainer.convert.diffusers_vae import (diffusers_vae_config, vae_from_diffusers, vae_keymap,
                                           vae_to_diffusers)
from trainer.convert.first_stage import load_first_stage
from trainer.models.autoencoder import (AttnBlock, AutoencoderConfig, AutoencoderKL,
                                        DiagonalGaussianDistribution, IdentityFirstStage,
                                        build_first_stage)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
# Tiny: a level with attention (8 and 4), a width change in every level (nin_shortcut in encoder and
# decoder). KL-f8-shaped: the SD layout (1,2,4,4, two res blocks, no level attention), reduced width.
TINY = dict(ch=32, ch_mult=[1, 2, 4], num_res_blocks=1, resolution=16, attn_resolutions=[8, 4])
KL_F8_SHAPED = dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2, resolution=64)
KL_F4 = dict(ch=128, ch_mult=[1, 2, 4], z_channels=3, embed_dim=3, num_res_blocks=2)


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pair(cfg: AutoencoderConfig, seed: int = 0):
    torch.manual_seed(seed)
    ours = AutoencoderKL(cfg).eval()
    theirs = diffusers.AutoencoderKL(**diffusers_vae_config(cfg)).eval()
    sd, report = vae_to_diffusers(ours.state_dict(), cfg)
    assert report.ok, report
    theirs.load_state_dict(sd, strict=True)
    return ours, theirs


# ---- parameter counts ------------------------------------------------------------------------

def test_kl_f8_parameter_count_on_meta():
    with torch.device("meta"):
        model = build_first_stage(AutoencoderConfig())
    assert _num_params(model) == 83_653_863
    assert all(p.is_meta for p in model.parameters())


def test_kl_f4_parameter_count_matches_diffusers_on_meta():
    cfg = AutoencoderConfig(**KL_F4)
    with torch.device("meta"):
        ours = build_first_stage(cfg)
        theirs = diffusers.AutoencoderKL(**diffusers_vae_config(cfg))
    assert _num_params(ours) == _num_params(theirs) == 55_312_063
    assert cfg.downsample_factor == 4 and cfg.latent_channels == 3


def test_compvis_parameter_names():
    keys = set(AutoencoderKL(AutoencoderConfig(**TINY)).state_dict())
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.1.attn.0.q.weight",
              "encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight",
              "encoder.mid.block_2.conv2.bias", "encoder.norm_out.weight",
              "decoder.up.0.block.1.conv1.weight", "decoder.up.0.block.0.nin_shortcut.weight",
              "decoder.up.2.upsample.conv.weight", "decoder.up.1.attn.1.k.bias",
              "quant_conv.weight", "post_quant_conv.bias"):
        assert k in keys, k
    assert "decoder.up.0.upsample.conv.weight" not in keys  # up[0] is the full-resolution level
    assert "encoder.down.2.downsample.conv.weight" not in keys
    assert not any(k.startswith("encoder.down.0.attn") for k in keys)  # 16 not in attn_resolutions
    model = AutoencoderKL(AutoencoderConfig(**TINY))
    assert model.encoder.conv_out.out_channels == 8 and model.decoder.conv_out.out_channels == 3
    assert tuple(model.decoder.up[0].block[0].conv1.weight.shape) == (32, 64, 3, 3)


# ---- parity with diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", [TINY, KL_F8_SHAPED], ids=["tiny", "kl_f8_shaped"])
def test_parity_with_diffusers(arch):
    cfg = AutoencoderConfig(**arch)
    ours, theirs = _pair(cfg)
    side = min(cfg.resolution, 32)  # any multiple of the downsample factor works; keep CPU time small
    torch.manual_seed(1)
    x = torch.randn(2, 3, side, side)
    z = torch.randn(2, 4, side // cfg.downsample_factor, side // cfg.downsample_factor)
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        assert post.mean.shape == (2, 4, side // cfg.downsample_factor, side // cfg.downsample_factor)
        assert (post.mean - ref.mean).abs().max() <= TOL
        assert (post.logvar - ref.logvar).abs().max() <= TOL
        assert (post.std - ref.std).abs().max() <= TOL
        out, ref_out = ours.decode(z), theirs.decode(z).sample
        assert out.shape == (2, 3, side, side)
        assert (out - ref_out).abs().max() <= TOL
        rec, _ = ours(x, sample_posterior=False)
        ref_rec = theirs(x, sample_posterior=False).sample
        assert (rec - ref_rec).abs().max() <= TOL


def test_attention_matches_compvis_formula():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 5, 3)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = block.q(h), block.k(h), block.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
        w = torch.softmax(w, dim=2)
        ref = x + block.proj_out(torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww))
        assert (block(x) - ref).abs().max() <= TOL


# ---- conversion -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [TINY, KL_F8_SHAPED], ids=["tiny", "kl_f8_shaped"])
def test_round_trip_conversion_is_bitwise(arch):
    cfg = AutoencoderConfig(**arch)
    ours, theirs = _pair(cfg)
    sd = ours.state_dict()
    back, report = vae_from_diffusers(vae_to_diffusers(sd, cfg)[0], cfg)
    assert report.ok and back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)

    torch.manual_seed(3)
    fresh = diffusers.AutoencoderKL(**diffusers_vae_config(cfg)).state_dict()
    ours_sd, report = vae_from_diffusers(fresh, cfg)
    assert report.ok
    AutoencoderKL(cfg).load_state_dict(ours_sd, strict=True)
    again, report = vae_to_diffusers(ours_sd, cfg)
    assert report.ok and again.keys() == fresh.keys()
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)


def test_keymap_orders_decoder_levels_in_reverse_and_reports_unknown_keys():
    cfg = AutoencoderConfig(**TINY)
    rows = {o: t for o, t, _ in vae_keymap(cfg).rows}
    assert rows["decoder.up.0.block.0.conv1.weight"] == "decoder.up_blocks.2.resnets.0.conv1.weight"
    assert rows["decoder.up.2.upsample.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert rows["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    sd = AutoencoderKL(cfg).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["quant_conv.bias"]
    _, report = vae_to_diffusers(sd, cfg)
    assert report.unexpected == ["extra.weight"] and report.missing == ["quant_conv.bias"]


def test_diffusers_config_fields():
    kw = diffusers_vae_config(AutoencoderConfig(**TINY, scale_factor=0.5, shift_factor=0.1))
    assert kw["down_block_types"] == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                                      "AttnDownEncoderBlock2D")
    assert kw["up_block_types"] == ("AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    assert kw["block_out_channels"] == (32, 64, 128) and kw["layers_per_block"] == 1
    assert (kw["latent_channels"], kw["norm_num_groups"], kw["sample_size"]) == (4, 32, 16)
    assert (kw["scaling_factor"], kw["shift_factor"]) == (0.5, 0.1)
    assert diffusers_vae_config(AutoencoderConfig())["shift_factor"] is None


def test_z_channels_different_from_embed_dim_builds_but_does_not_export():
    cfg = AutoencoderConfig(**TINY, z_channels=6, embed_dim=3)
    model = AutoencoderKL(cfg)
    assert tuple(model.quant_conv.weight.shape) == (6, 12, 1, 1)
    assert tuple(model.post_quant_conv.weight.shape) == (6, 3, 1, 1)
    assert model.encode(torch.randn(1, 3, 16, 16)).mean.shape == (1, 3, 4, 4)
    for fn in (diffusers_vae_config, lambda c: vae_to_diffusers(model.state_dict(), c)):
        with pytest.raises(ValueError, match=r"z_channels=6.*embed_dim=3"):
            fn(cfg)


# ---- posterior --------------------------------------------------------------------------------

def test_posterior_math_by_hand():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 2, 1, 2)
    logvar = torch.tensor([0.0, math.log(4.0), -1.0, 25.0]).reshape(1, 2, 1, 2)
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    lv = [0.0, math.log(4.0), -1.0, 20.0]  # clamped to [-30, 20]
    m = [0.5, -1.0, 2.0, 0.0]
    kl = 0.5 * sum(mi ** 2 + math.exp(li) - 1.0 - li for mi, li in zip(m, lv))
    assert post.kl().shape == (1,)
    assert post.kl().item() == pytest.approx(kl, rel=1e-6)
    assert post.logvar.flatten()[3].item() == 20.0
    assert torch.equal(post.var, torch.exp(post.logvar))
    assert torch.equal(post.std, torch.exp(0.5 * post.logvar))
    assert post.mode() is post.mean

    other = DiagonalGaussianDistribution(torch.cat([torch.ones_like(mean), torch.zeros_like(mean)], 1))
    kl_other = 0.5 * sum((mi - 1.0) ** 2 + math.exp(li) - 1.0 - li for mi, li in zip(m, lv))
    assert post.kl(other).item() == pytest.approx(kl_other, rel=1e-6)

    sample = torch.tensor([1.0, 0.0, 2.5, 3.0]).reshape(1, 2, 1, 2)
    nll = 0.5 * sum(math.log(2 * math.pi) + li + (si - mi) ** 2 / math.exp(li)
                    for si, mi, li in zip(sample.flatten().tolist(), m, lv))
    assert post.nll(sample).item() == pytest.approx(nll, rel=1e-6)


def test_sample_uses_generator_deterministically():
    torch.manual_seed(0)
    params = torch.randn(2, 8, 3, 3)
    post = DiagonalGaussianDistribution(params)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, post.mean + post.std * noise)


def test_forward_sample_posterior_uses_generator():
    model = AutoencoderKL(AutoencoderConfig(**TINY)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        r1, _ = model(x, generator=torch.Generator().manual_seed(1))
        r2, _ = model(x, generator=torch.Generator().manual_seed(1))
        r3, post = model(x, sample_posterior=False)
        assert torch.equal(r1, r2) and not torch.equal(r1, r3)
        assert torch.equal(r3, model.decode(post.mean))


def test_bad_posterior_parameters():
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 2\)"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


# ---- identity first stage and latent scaling --------------------------------------------------

def test_identity_first_stage_is_exact():
    stage = build_first_stage(AutoencoderConfig(kind="identity", scale_factor=1.0))
    assert isinstance(stage, IdentityFirstStage) and _num_params(stage) == 0
    x = torch.randn(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    post = stage.encode(x)
    assert torch.equal(post.sample(gen), x) and torch.equal(post.mode(), x)
    assert torch.equal(gen.get_state(), state)  # a point mass draws no noise
    assert torch.equal(post.kl(), torch.zeros(2)) and torch.equal(post.std, torch.zeros_like(x))
    rec, _ = stage(x, generator=gen)
    assert torch.equal(rec, x)
    assert torch.equal(stage.encode_latent(x), x) and torch.equal(stage.decode_latent(x), x)
    assert (stage.scale_factor, stage.shift_factor, stage.downsample_factor) == (1.0, 0.0, 1)
    cfg = AutoencoderConfig(kind="identity", in_channels=1, out_ch=1)
    assert cfg.latent_channels == 1 and cfg.downsample_factor == 1


def test_identity_warns_about_ignored_scale():
    with pytest.warns(UserWarning, match="scale_factor=0.5"):
        build_first_stage(AutoencoderConfig(kind="identity", scale_factor=0.5))


def test_scale_shift_round_trip():
    model = AutoencoderKL(AutoencoderConfig(**TINY, scale_factor=0.18215, shift_factor=0.25))
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    latent = model.to_latent(z)
    assert torch.equal(latent, (z - 0.25) * 0.18215)
    assert torch.allclose(model.from_latent(latent), z, rtol=0, atol=1e-12)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.encode_latent(x, sample_posterior=False),
                           model.to_latent(model.encode(x).mode()))
        latent = latent.float()
        assert torch.equal(model.decode_latent(latent), model.decode(model.from_latent(latent)))


# ---- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, pattern", [
    (dict(kind="vqgan"), r"kind='vqgan'.*kl, vq, identity"),
    (dict(attn_resolutions=[48]), r"attn_resolutions=\[48\].*\[256, 128, 64, 32\]"),
    (dict(resolution=100), r"resolution=100.*downsample factor 8"),
    (dict(ch=48), r"ch=48.*GroupNorm\(32\)"),
    (dict(ch=48, ch_mult=[2, 3]), r"widths \[144\]"),
    (dict(ch=0), r"ch=0 must be >= 1"),
    (dict(num_res_blocks=0), r"num_res_blocks=0"),
    (dict(embed_dim=-1), r"embed_dim=-1"),
    (dict(ch_mult=[]), r"ch_mult=\[\]"),
    (dict(in_channels=0), r"in_channels=0"),
    (dict(double_z=False), r"double_z=False"),
    (dict(dropout=1.0), r"dropout=1.0"),
    (dict(scale_factor=0.0), r"scale_factor=0.0"),
    (dict(kind="identity", out_ch=1), r"out_ch=1 must equal in_channels=3"),
])
def test_config_rejects_bad_values(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        AutoencoderConfig(**overrides)


def test_config_accepts_presets_and_structured_merge():
    cfg = AutoencoderConfig(attn_resolutions=[32])
    assert cfg.level_resolutions == [256, 128, 64, 32] and cfg.downsample_factor == 8
    assert cfg.latent_channels == 4
    merged = OmegaConf.merge(OmegaConf.structured(AutoencoderConfig),
                             {"ch_mult": [1, 2, 4], "embed_dim": 3})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, AutoencoderConfig) and cfg.ch_mult == [1, 2, 4] and cfg.downsample_factor == 4
    with pytest.raises(ValueError, match="resolution=20"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AutoencoderConfig), {"resolution": 20}))


def test_encode_decode_reject_bad_shapes():
    model = AutoencoderKL(AutoencoderConfig(**TINY))
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16\).*\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="kind 'kl'"):
        AutoencoderKL(AutoencoderConfig(kind="identity"))


# ---- checkpoints ------------------------------------------------------------------------------

def _trained(cfg):
    torch.manual_seed(11)
    model = AutoencoderKL(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.state_dict()


def _assert_loaded(cfg, path, reference):
    loaded = load_first_stage(AutoencoderConfig(**TINY, checkpoint_path=str(path))).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_load_safetensors(tmp_path):
    cfg = AutoencoderConfig(**TINY)
    sd = _trained(cfg)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vae.safetensors"))
    _assert_loaded(cfg, tmp_path / "vae.safetensors", sd)


def test_load_compvis_ldm_checkpoint_with_prefix(tmp_path):
    cfg = AutoencoderConfig(**TINY)
    sd = _trained(cfg)
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    full["cond_stage_model.proj.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": full, "global_step": 470000}, tmp_path / "ldm.ckpt")
    _assert_loaded(cfg, tmp_path / "ldm.ckpt", sd)


def test_load_compvis_autoencoder_checkpoint_drops_loss_weights(tmp_path):
    cfg = AutoencoderConfig(**TINY)
    sd = _trained(cfg)
    torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(())}}, tmp_path / "model.ckpt")
    _assert_loaded(cfg, tmp_path / "model.ckpt", sd)


def test_load_diffusers_layout(tmp_path):
    cfg = AutoencoderConfig(**TINY)
    sd = _trained(cfg)
    save_file(vae_to_diffusers(sd, cfg)[0], str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _assert_loaded(cfg, tmp_path / "diffusion_pytorch_model.safetensors", sd)


def test_load_reports_missing_unexpected_and_mismatched(tmp_path):
    cfg = AutoencoderConfig(**TINY)
    sd = dict(_trained(cfg))
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)bad\.safetensors.*missing \(1\): decoder\.conv_out\.bias"
                                         r".*unexpected \(1\): encoder\.extra"):
        load_first_stage(AutoencoderConfig(**TINY, checkpoint_path=str(tmp_path / "bad.safetensors")))
    wide = AutoencoderKL(AutoencoderConfig(**{**TINY, "ch": 64})).state_dict()
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"wide\.safetensors.*decoder\.conv_in\.weight: "
                                         r"checkpoint \(256, 4, 3, 3\) vs model \(128, 4, 3, 3\)"):
        load_first_stage(AutoencoderConfig(**TINY, checkpoint_path=str(tmp_path / "wide.safetensors")))


def test_missing_checkpoint_names_path_and_key(tmp_path):
    path = tmp_path / "nowhere" / "vae.safetensors"
    with pytest.raises(FileNotFoundError,
                       match=r"model\.autoencoder\.checkpoint_path=.*nowhere/vae\.safetensors"):
        load_first_stage(AutoencoderConfig(**TINY, checkpoint_path=str(path)))
    # Meta-device planning builds without reading weights.
    with torch.device("meta"):
        assert _num_params(build_first_stage(AutoencoderConfig(**TINY, checkpoint_path=str(path)))) > 0


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "obj": _Opaque()},
               tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_first_stage(AutoencoderConfig(**TINY, checkpoint_path=str(tmp_path / "pickled.ckpt")))


class _Opaque:
    pass
