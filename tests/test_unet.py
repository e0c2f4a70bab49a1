"""UNet: parameter counts, parity with diffusers ``UNet2DConditionModel``, conversion, config
validation, activation checkpointing and channels_last."""

from __future__ import annotations

import pytest
import torch

from trainer.convert.diffusers_unet import (diffusers_unet_config, unet_from_diffusers, unet_keymap,
                                            unet_to_diffusers)
from trainer.models.attention import GEGLU
from trainer.models.unet import CHECKPOINT_BLOCKS, UNetConfig, UNetModel, timestep_embedding
from trainer.runtime.engine import apply_activation_checkpointing, is_checkpointed

diffusers = pytest.importorskip("diffusers")

SD_V2 = dict(num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)

TINY = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
            num_heads=4, context_dim=16, norm_num_groups=8)
# SD-shaped (4 levels, 2 res blocks, attention at ds 1/2/4, none at the last level) with reduced width.
SD_V1_SHAPED = dict(model_channels=32, channel_mult=[1, 2, 4, 4], norm_num_groups=16, num_heads=8,
                    context_dim=48)
SD_V2_SHAPED = dict(model_channels=64, channel_mult=[1, 2, 4, 4], norm_num_groups=32, num_heads=-1,
                    num_head_channels=32, use_linear_in_transformer=True, context_dim=40,
                    transformer_depth=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny; with several intra-op threads on a shared CI box the OpenMP
    # workers spin-wait on each other and a millisecond forward can take seconds.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomize(model: torch.nn.Module) -> None:
    # Zero-initialised output projections would hide half the network from a parity check.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)


def _pair(kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = UNetConfig(**kwargs)
    ours = UNetModel(cfg)
    _randomize(ours)
    theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
    state, report = unet_to_diffusers(ours.state_dict(), cfg)
    assert report.ok, report
    theirs.load_state_dict(state, strict=True)
    return cfg, ours, theirs


def _inputs(cfg: UNetConfig, side: int = 16, batch: int = 2, length: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=gen)
    t = torch.tensor([3, 981][:batch])
    context = torch.randn(batch, length, cfg.context_dim, generator=gen)
    return x, t, context


# --- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    (dict(context_dim=1280), 872_300_484),  # ldm_1p45b (LAION-400M text-to-image, BERT context)
    (dict(), 859_520_964),                  # SD v1
    (SD_V2, 865_910_724),                   # SD v2
])
def test_parameter_count_on_meta(kwargs, expected):
    with torch.device("meta"):
        model = UNetModel(UNetConfig(**kwargs))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("kwargs", [dict(), SD_V2], ids=["sd_v1", "sd_v2"])
def test_keymap_matches_full_size_diffusers_layout(kwargs):
    cfg = UNetConfig(**kwargs)
    with torch.device("meta"):
        ours = UNetModel(cfg)
        theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    rows = unet_keymap(cfg).rows
    assert {o for o, _, _ in rows} == set(ours_shapes)
    assert {t for _, t, _ in rows} == set(theirs_shapes)
    assert len(rows) == len(ours_shapes) == len(theirs_shapes)
    assert all(ours_shapes[o] == theirs_shapes[t] for o, t, _ in rows)


def test_diffusers_config_heads():
    v1 = diffusers_unet_config(UNetConfig())
    assert v1["attention_head_dim"] == 8
    assert v1["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert v1["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert v1["use_linear_projection"] is False and v1["cross_attention_dim"] == 768
    v2 = diffusers_unet_config(UNetConfig(**SD_V2))
    assert v2["attention_head_dim"] == [5, 10, 20, 20]
    assert v2["use_linear_projection"] is True and v2["cross_attention_dim"] == 1024


# --- parity with diffusers -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    TINY, dict(TINY, attention_resolutions=[2]), dict(TINY, attention_resolutions=[]),
    SD_V1_SHAPED, SD_V2_SHAPED,
], ids=["tiny", "tiny_attn_at_last_level", "tiny_attn_in_middle_only", "sd_v1_shaped", "sd_v2_shaped"])
def test_forward_parity_and_round_trip(kwargs):
    cfg, ours, theirs = _pair(kwargs)
    x, t, context = _inputs(cfg)
    with torch.no_grad():
        out = ours(x, t, context)
        ref = theirs(x, t, context).sample
    assert out.shape == (2, cfg.out_channels, 16, 16)
    assert out.abs().mean() > 1e-2  # the comparison below is not between two near-zero tensors
    assert (out - ref).abs().max().item() <= 1e-5

    back, report = unet_from_diffusers(theirs.state_dict(), cfg)
    assert report.ok, report
    ours_state = ours.state_dict()
    assert set(back) == set(ours_state)
    assert all(torch.equal(back[k], v) for k, v in ours_state.items())
    again, _ = unet_to_diffusers(back, cfg)
    assert all(torch.equal(again[k], v) for k, v in theirs.state_dict().items())


def test_backward_parity_tiny():
    """Gradients agree too (our GEGLU recomputes gelu in backward; diffusers stores it)."""
    cfg, ours, theirs = _pair(TINY)
    x, t, context = _inputs(cfg)
    ours(x, t, context).square().mean().backward()
    theirs(x, t, context).sample.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    converted, _ = unet_to_diffusers(grads, cfg)
    for name, p in theirs.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert (converted[name] - p.grad).abs().max().item() <= 1e-5 * max(1.0, scale), name


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ours = timestep_embedding(t, 320)
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[:, 0], torch.cos(t)) and torch.equal(ours[:, 160], torch.sin(t))


def test_conversion_reports_unknown_and_missing_keys():
    cfg = UNetConfig(**TINY)
    state = UNetModel(cfg).state_dict()
    state["extra.weight"] = torch.zeros(1)
    dropped = "input_blocks.1.1.proj_in.weight"
    del state[dropped]
    _, report = unet_to_diffusers(state, cfg)
    assert report.unexpected == ["extra.weight"] and report.missing == [dropped]
    with pytest.raises(ValueError, match="proj_in"):
        report.raise_if_incomplete("unet")


# --- config and input validation -----------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    (dict(num_heads=8, num_head_channels=64), "exactly one"),
    (dict(num_heads=-1, num_head_channels=-1), "exactly one"),
    (dict(num_heads=0, num_head_channels=64), "exactly one"),
    (dict(num_heads=7), r"num_heads=7 must divide .*320"),
    (dict(num_heads=-1, num_head_channels=48), r"num_head_channels=48 must divide .*320"),
    (dict(attention_resolutions=[4, 3]), r"attention_resolutions contains 3.*allowed: \[1, 2, 4, 8\]"),
    (dict(attention_resolutions=[16]), r"contains 16"),
    (dict(norm_num_groups=48), r"norm_num_groups=48 must divide"),
    (dict(model_channels=0), r"model_channels=0 must be a positive"),
    (dict(num_res_blocks=-1), r"num_res_blocks=-1"),
    (dict(transformer_depth=0), r"transformer_depth=0"),
    (dict(context_dim=0), r"context_dim=0"),
    (dict(channel_mult=[]), r"channel_mult=\[\]"),
    (dict(channel_mult=[1, 0]), r"channel_mult=\[1, 0\]"),
    (dict(dropout=1.0), r"dropout=1.0"),
])
def test_config_rejects(override, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**override)


def test_heads_checked_only_where_attention_is_used():
    # 96 channels at ds=2 has no attention, so 64-wide heads need not divide it; the middle block
    # (last level, 128 channels) always has attention.
    UNetConfig(model_channels=32, channel_mult=[2, 3, 4], attention_resolutions=[1],
               num_heads=-1, num_head_channels=64)
    with pytest.raises(ValueError, match="num_head_channels=64 must divide .*96"):
        UNetConfig(model_channels=32, channel_mult=[2, 3, 4], attention_resolutions=[2],
                   num_heads=-1, num_head_channels=64)


def test_forward_rejects_indivisible_size():
    model = UNetModel(UNetConfig(**TINY))
    with pytest.raises(ValueError, match=r"divisible by 2"):
        model(torch.randn(1, 4, 15, 16), torch.tensor([1]), torch.randn(1, 3, 16))


def test_converter_rejects_config_diffusers_cannot_express():
    cfg = UNetConfig(**TINY)
    cfg.num_heads = 3  # mutated after validation: 32 channels would get 3 x 10 = 30-wide attention
    with pytest.raises(ValueError, match="num_heads=3"):
        diffusers_unet_config(cfg)
    with pytest.raises(ValueError, match="num_heads=3"):
        unet_to_diffusers({}, cfg)


@pytest.mark.parametrize("enabled, match", [
    ("transformer", r"pass a list of block kinds"),
    (["attention"], r"\['attention'\] are unknown"),
])
def test_set_activation_checkpointing_rejects(enabled, match):
    with pytest.raises(ValueError, match=match):
        apply_activation_checkpointing(UNetModel(UNetConfig(**TINY)), enabled, CHECKPOINT_BLOCKS)


# --- checkpointing, memory format, precision -----------------------------------------------------

def _count_calls(model: UNetModel) -> dict[str, int]:
    """Counts forward calls of the first ResBlock's and first transformer's inner layers."""
    calls = {"res": 0, "transformer": 0}
    res = model.input_blocks[1][0]
    transformer = model.input_blocks[1][1]

    def counter(kind):
        def hook(*_):
            calls[kind] += 1
        return hook

    res.in_layers.register_forward_hook(counter("res"))
    transformer.norm.register_forward_hook(counter("transformer"))
    return calls


@pytest.mark.parametrize("enabled, recomputed", [
    (True, {"res", "transformer"}),
    (["res"], {"res"}),
    (["transformer"], {"transformer"}),
])
def test_activation_checkpointing_gives_identical_grads(enabled, recomputed):
    kwargs = dict(TINY, dropout=0.3)  # dropout: the recomputation must replay the same masks
    torch.manual_seed(0)
    cfg = UNetConfig(**kwargs)
    reference = UNetModel(cfg)
    _randomize(reference)
    checkpointed = UNetModel(cfg)
    checkpointed.load_state_dict(reference.state_dict())
    apply_activation_checkpointing(checkpointed, enabled, CHECKPOINT_BLOCKS)
    calls = _count_calls(checkpointed)
    x, t, context = _inputs(cfg)
    context.requires_grad_(True)

    grads = []
    for model in (reference, checkpointed):
        torch.manual_seed(123)
        model(x, t, context).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()} | {"context": context.grad})
        context.grad = None
    for kind in ("res", "transformer"):
        assert calls[kind] == (2 if kind in recomputed else 1), kind
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert grads[0]["input_blocks.1.0.in_layers.2.weight"].abs().sum() > 0

    checkpointed.eval()  # no recomputation outside training
    calls.update(res=0, transformer=0)
    checkpointed(x, t, context).sum().backward()
    assert calls == {"res": 1, "transformer": 1}


def test_checkpointing_applied_and_removed_from_outside():
    model = UNetModel(UNetConfig(**TINY))
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, True, CHECKPOINT_BLOCKS)
    assert is_checkpointed(model.input_blocks[1][0]) and is_checkpointed(model.input_blocks[1][1])
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and the EMA keep their names
    apply_activation_checkpointing(model, False, CHECKPOINT_BLOCKS)
    assert not is_checkpointed(model.input_blocks[1][0]) and not is_checkpointed(model.input_blocks[1][1])


@pytest.mark.parametrize("kwargs", [TINY, dict(TINY, use_linear_in_transformer=True)],
                         ids=["conv_proj", "linear_proj"])
def test_channels_last_matches_contiguous(kwargs):
    torch.manual_seed(0)
    cfg = UNetConfig(**kwargs)
    model = UNetModel(cfg)
    _randomize(model)
    x, t, context = _inputs(cfg)
    ref = model(x, t, context)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.to(memory_format=torch.channels_last)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t, context)
    out.square().mean().backward()
    assert (out - ref).abs().max().item() <= 1e-5
    assert ref.abs().mean() > 1e-2
    for name, p in model.named_parameters():
        scale = max(1.0, ref_grads[name].abs().max().item())
        assert (p.grad - ref_grads[name]).abs().max().item() <= 1e-5 * scale, name


def test_geglu_recomputing_backward_matches_autograd():
    torch.manual_seed(0)
    geglu = GEGLU(8, 16)
    x = torch.randn(2, 5, 8, requires_grad=True)
    grad = torch.randn(2, 5, 16)
    out = geglu(x)
    out.backward(grad)
    got = (x.grad, geglu.proj.weight.grad, geglu.proj.bias.grad)
    x.grad = geglu.proj.weight.grad = geglu.proj.bias.grad = None
    a, gate = geglu.proj(x).chunk(2, dim=-1)
    ref_out = a * torch.nn.functional.gelu(gate)
    ref_out.backward(grad)
    assert torch.equal(out, ref_out)
    for g, r in zip(got, (x.grad, geglu.proj.weight.grad, geglu.proj.bias.grad)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_and_bf16_weights():
    torch.manual_seed(0)
    cfg = UNetConfig(**TINY)
    model = UNetModel(cfg)
    _randomize(model)
    x, t, context = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = model(x, t, context)
        bf16_out = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert autocast_out.dtype == torch.bfloat16 and bf16_out.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    assert (autocast_out.float() - ref).abs().max().item() < 0.05 * scale
    assert (bf16_out.float() - ref).abs().max().item() < 0.05 * scale

    # Training under autocast: GEGLU's own backward runs on bf16 activations.
    model.float()
    model(x, t, context).square().mean().backward()
    ref_grad = model.input_blocks[1][0].in_layers[2].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t, context).float().square().mean()
    loss.backward()
    grad = model.input_blocks[1][0].in_layers[2].weight.grad
    assert grad.dtype == torch.float32
    assert (grad - ref_grad).abs().max().item() < 0.1 * ref_grad.abs().max().item()


def test_scalar_timestep_broadcasts():
    torch.manual_seed(0)
    cfg = UNetConfig(**TINY)
    model = UNetModel(cfg)
    _randomize(model)
    x, _, context = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(5), context), model(x, torch.tensor([5, 5]), context))


def test_zero_init_output_is_zero():
    # CompVis zero-initialises the last conv, so an untrained UNet predicts exactly zero.
    cfg = UNetConfig(**TINY)
    x, t, context = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(UNetModel(cfg)(x, t, context), torch.zeros_like(x))
