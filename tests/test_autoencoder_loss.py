"""The KL autoencoder's training loss (CompVis LPIPSWithDiscriminator): each term against a hand
computation, the discriminator's schedule and gradients, the adaptive weight on a tiny AutoencoderKL,
the PatchGAN (taming parameter count, init, ActNorm), the LPIPS backbone loader and config checks."""

import math
import re
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import trainer.autoencoder_loss as ael
from trainer.autoencoder_loss import (VGG16_CONV_INDICES, VGG16_FILE, VGG16_URL, AutoencoderLoss,
                                      AutoencoderLossConfig, adaptive_weight, adopt_weight, build_lpips,
                                      hinge_d_loss, logs_to_floats, vanilla_d_loss)
from trainer.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution
from trainer.models.discriminator import ActNorm, NLayerDiscriminator

# Distinct, non-default weights so that a swapped or dropped factor changes the numbers.
CFG = dict(lpips_random_backbone=True, disc_ndf=8, disc_num_layers=2, disc_start=5, kl_weight=1e-2,
           pixel_weight=0.8, perceptual_weight=0.5, logvar_init=0.3, disc_factor=0.7, disc_weight=0.5)
NUM_PIXELS = 3 * 16 * 16  # C * H * W of the test images


@pytest.fixture(scope="module")
def shared_lpips():
    """One random-trunk LPIPS for the module (building VGG16 is the slow part); it is frozen."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised VGG16"):
        return build_lpips(random_backbone=True)


@pytest.fixture
def make_loss(shared_lpips, monkeypatch):
    monkeypatch.setattr(ael, "build_lpips", lambda *args, **kwargs: shared_lpips)

    def _make(**overrides) -> AutoencoderLoss:
        cfg = AutoencoderLossConfig(**{**CFG, **overrides})
        return AutoencoderLoss(cfg, generator=torch.Generator().manual_seed(1)).train()

    return _make


def _images(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 16, 16, generator=gen) * 2 - 1
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    return x, x_hat


def _posterior(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(2, 4, 2, 2, generator=gen)
    logvar = 0.5 * torch.randn(2, 4, 2, 2, generator=gen)
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)), mean, logvar


def _hand_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed per image, averaged over the batch."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / mean.shape[0]


def _hand_nll(x, x_hat, lpips_values, pixel_weight, perceptual_weight, logvar) -> torch.Tensor:
    """CompVis nll per image: every pixel carries L1 and the image's LPIPS value, under exp(logvar)."""
    per_image = [((pixel_weight * (x[b] - x_hat[b]).abs().sum()
                   + perceptual_weight * lpips_values[b] * NUM_PIXELS) / math.exp(logvar)
                  + logvar * NUM_PIXELS) for b in range(x.shape[0])]
    return sum(per_image) / x.shape[0]


def _tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, resolution=16,
                                           z_channels=4, embed_dim=4))


def _calls(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------------------
# Pure terms


def test_hinge_and_vanilla_d_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = (0, 0.5, 2); relu(1 + fake) = (0, 1, 2.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3), abs=1e-6)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3
                      + sum(softplus(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, abs=1e-6)
    # Means over all patch logits, whatever their shape.
    assert hinge_d_loss(real.view(1, 1, 3, 1), fake.view(1, 1, 1, 3)).item() == pytest.approx(1.0, abs=1e-6)


def test_adopt_weight_compvis_semantics():
    assert adopt_weight(0.7, global_step=4, threshold=5) == 0.0
    assert adopt_weight(0.7, global_step=5, threshold=5) == 0.7
    assert adopt_weight(0.7, global_step=10**6, threshold=5) == 0.7
    assert adopt_weight(0.7, global_step=0, threshold=0) == 0.7


def test_adaptive_weight_formula_and_clamp():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    nll = (w * torch.tensor([3.0, 4.0])).sum()  # grad (3, 4), norm 5
    g = (w * torch.tensor([0.0, 2.0])).sum()  # grad (0, 2), norm 2
    d = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert d.item() == pytest.approx(5.0 / (2.0 + 1e-4) * 0.5, rel=1e-6)
    assert not d.requires_grad
    # Graphs are retained: both losses can still be backpropagated.
    (nll + g).backward()
    assert w.grad.tolist() == [3.0, 6.0]
    w.grad = None
    big = adaptive_weight(1e9 * (w * w).sum(), (w * 1e-3).sum(), w, disc_weight=0.5)
    assert big.item() == pytest.approx(1e4 * 0.5)
    zero_g = adaptive_weight((w * w).sum(), (w * 0.0).sum(), w, disc_weight=1.0)
    assert zero_g.item() == pytest.approx(1e4)  # 10 / 1e-4 = 1e5, clamped


def test_logs_to_floats():
    logs = {"a": torch.tensor(1.5), "b": torch.tensor(2, dtype=torch.int64), "c": torch.tensor([3.25])}
    assert logs_to_floats(logs) == {"a": 1.5, "b": 2.0, "c": 3.25}
    assert logs_to_floats({}) == {}


# ---------------------------------------------------------------------------------------------------
# Generator loss


def test_nll_l1_lpips_logvar_and_kl_before_disc_start(make_loss, shared_lpips):
    loss = make_loss()
    x, x_hat = _images()
    posterior, mean, logvar = _posterior()
    total, logs = loss.generator_loss(x, x_hat, posterior, global_step=0)
    lpips_values = shared_lpips(x, x_hat).flatten()  # (B,)
    assert (lpips_values > 0).all() and shared_lpips(x, x).abs().max() < 1e-6
    nll = _hand_nll(x, x_hat, lpips_values, 0.8, 0.5, 0.3)
    kl = _hand_kl(mean, logvar)
    torch.testing.assert_close(total, nll + 1e-2 * kl, rtol=1e-5, atol=1e-4)
    values = logs_to_floats(logs)
    l1 = (x - x_hat).abs()
    expected = {"total": (nll + 1e-2 * kl).item(), "logvar": 0.3, "kl": kl.item(), "nll": nll.item(),
                "l1": l1.mean().item(), "lpips": lpips_values.mean().item(),
                "rec": (0.8 * l1.mean() + 0.5 * lpips_values.mean()).item(),
                "d_weight": 0.0, "disc_factor": 0.0, "g_loss": 0.0}
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_logvar_is_learned_through_the_nll(make_loss):
    loss = make_loss()
    x, x_hat = _images(1)
    total, logs = loss.generator_loss(x, x_hat, DiagonalGaussianDistribution.point_mass(x), 0)
    total.backward()
    # nll = (R e^-s + s N) / B with R the summed weighted reconstruction term and N pixels in the
    # batch, so d nll / d s = (N - R e^-s) / B.
    summed_rec = logs["rec"].item() * x.numel()
    expected = (x.numel() - summed_rec * math.exp(-0.3)) / x.shape[0]
    assert loss.logvar.grad.item() == pytest.approx(expected, rel=1e-4)


def test_without_lpips_the_nll_is_weighted_l1(make_loss):
    loss = make_loss(perceptual_weight=0.0, lpips_random_backbone=False)
    assert loss.perceptual_loss is None
    x, x_hat = _images(2)
    total, logs = loss.generator_loss(x, x_hat, DiagonalGaussianDistribution.point_mass(x), 0)
    nll = _hand_nll(x, x_hat, torch.zeros(2), 0.8, 0.0, 0.3)
    torch.testing.assert_close(total, nll, rtol=1e-5, atol=1e-4)  # point mass: kl 0
    assert logs["lpips"].item() == 0.0 and logs["kl"].item() == 0.0


def test_kl_weighting_with_hand_built_posteriors(make_loss):
    loss = make_loss(kl_weight=0.25)
    x, x_hat = _images(3)
    posterior, mean, logvar = _posterior(1)
    total, logs = loss.generator_loss(x, x_hat, posterior, 0)
    total_point, _ = loss.generator_loss(x, x_hat, DiagonalGaussianDistribution.point_mass(mean), 0)
    kl = _hand_kl(mean, logvar)
    assert kl.item() > 1.0
    torch.testing.assert_close(total - total_point, 0.25 * kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logs["kl"], kl, rtol=1e-5, atol=1e-6)


def test_discriminator_inactive_before_disc_start(make_loss):
    loss = make_loss()
    calls = _calls(loss.discriminator)
    x, _ = _images(4)
    w = torch.nn.Parameter(torch.eye(3).view(3, 3, 1, 1) * 0.9)  # a one-layer "decoder"
    for step in (0, 4):
        x_hat = F.conv2d(x, w)
        total, logs = loss.generator_loss(x, x_hat, _posterior()[0], step, last_layer=w)
        torch.testing.assert_close(total, logs["nll"] + 1e-2 * logs["kl"], rtol=1e-6, atol=1e-5)
        assert logs["g_loss"].item() == logs["d_weight"].item() == logs["disc_factor"].item() == 0.0
        total.backward()
        d_loss, d_logs = loss.discriminator_loss(x, x_hat, step)
        assert d_loss.item() == 0.0 and not d_loss.requires_grad
        assert logs_to_floats(d_logs) == {"disc_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0,
                                          "disc_active": 0.0}
        assert not loss.disc_active(step)
    assert calls == []  # the discriminator never ran
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert w.grad is not None and loss.logvar.grad is not None
    assert loss.disc_active(5)
    assert not make_loss(disc_factor=0.0).disc_active(10**6)


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_discriminator_loss_active_at_disc_start(make_loss, disc_loss):
    loss = make_loss(disc_loss=disc_loss)
    calls = _calls(loss.discriminator)
    x, _ = _images(5)
    w = torch.nn.Parameter(torch.eye(3).view(3, 3, 1, 1) * 0.9)
    x_hat = F.conv2d(x, w)
    d_loss, logs = loss.discriminator_loss(x, x_hat, global_step=5)
    assert len(calls) == 2  # real and fake in separate passes (BatchNorm statistics per pass)
    # Training-mode BatchNorm normalises with batch statistics, so a second pass gives the same logits.
    real, fake = loss.discriminator(x), loss.discriminator(x_hat.detach())
    if disc_loss == "hinge":
        hand = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    else:
        hand = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    torch.testing.assert_close(d_loss, 0.7 * hand, rtol=1e-5, atol=1e-6)
    values = logs_to_floats(logs)
    assert values["disc_active"] == 1.0
    assert values["logits_real"] == pytest.approx(real.mean().item(), abs=1e-6)
    assert values["logits_fake"] == pytest.approx(fake.mean().item(), abs=1e-6)
    d_loss.backward()
    grads = [p.grad for p in loss.discriminator_parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert w.grad is None and loss.logvar.grad is None  # images are detached


def test_generator_adversarial_term_with_adaptive_weight_on_autoencoder(make_loss, shared_lpips):
    loss = make_loss()
    ae = _tiny_autoencoder()
    x, _ = _images(6)
    x_hat, posterior = ae(x, generator=torch.Generator().manual_seed(0))
    last = ae.decoder.conv_out.weight
    total, logs = loss.generator_loss(x, x_hat, posterior, global_step=7, last_layer=last)

    nll = _hand_nll(x, x_hat, shared_lpips(x, x_hat).flatten(), 0.8, 0.5, 0.3)
    kl = posterior.kl().sum() / 2
    g_loss = -loss.discriminator(x_hat).mean()
    nll_norm = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    g_norm = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    d_weight = (nll_norm / (g_norm + 1e-4)).clamp(0, 1e4).item() * 0.5
    assert 0 < d_weight < 0.5 * 1e4  # a real ratio, not the clamp
    assert logs["d_weight"].item() == pytest.approx(d_weight, rel=1e-4)
    assert logs["g_loss"].item() == pytest.approx(g_loss.item(), rel=1e-5, abs=1e-6)
    assert logs["disc_factor"].item() == pytest.approx(0.7)
    hand_total = nll + 1e-2 * kl + d_weight * 0.7 * g_loss
    torch.testing.assert_close(total, hand_total, rtol=1e-5, atol=1e-3)

    # The gradient treats d_weight as a constant and leaves the discriminator untouched.
    expected_grad = torch.autograd.grad(hand_total, last, retain_graph=True)[0]
    total.backward()
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(last.grad, expected_grad, rtol=1e-3, atol=1e-4 * scale)
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert loss.logvar.grad is not None


def test_training_generator_loss_needs_last_layer(make_loss):
    loss = make_loss()
    x, x_hat = _images(7)
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, x_hat.requires_grad_(), _posterior()[0], global_step=5)


def test_eval_mode_has_no_adaptive_weight(make_loss):
    loss = make_loss().eval()
    x, x_hat = _images(8)
    with torch.no_grad():
        total, logs = loss.generator_loss(x, x_hat, _posterior()[0], global_step=100)
        g_loss = -loss.discriminator(x_hat).mean()  # eval-mode BatchNorm: running statistics
    assert logs["d_weight"].item() == 0.0
    assert logs["g_loss"].item() == pytest.approx(g_loss.item(), abs=1e-6) and g_loss.item() != 0.0
    torch.testing.assert_close(total, logs["nll"] + 1e-2 * logs["kl"], rtol=1e-6, atol=1e-5)


def test_modes_and_parameter_groups(make_loss):
    loss = make_loss()
    assert loss.perceptual_loss is not None
    loss.train()
    assert loss.discriminator.training
    assert not any(m.training for m in loss.perceptual_loss.modules())  # its dropout stays off
    assert not any(p.requires_grad for p in loss.perceptual_loss.parameters())
    assert loss.generator_parameters() == [loss.logvar]
    assert loss.logvar.item() == pytest.approx(0.3) and loss.logvar.shape == (1,)
    disc = {id(p) for p in loss.discriminator_parameters()}
    assert disc == {id(p) for p in loss.discriminator.parameters()}
    assert id(loss.logvar) not in disc
    trainable = {id(p) for p in loss.parameters() if p.requires_grad}
    assert trainable == disc | {id(loss.logvar)}


def test_discriminator_init_is_seeded_by_the_caller(make_loss):
    a, b = make_loss(), make_loss()
    for (name, pa), pb in zip(a.discriminator.state_dict().items(), b.discriminator.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = AutoencoderLoss(AutoencoderLossConfig(**CFG), generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.discriminator.main[0].weight, c.discriminator.main[0].weight)


# ---------------------------------------------------------------------------------------------------
# The PatchGAN


def _taming_count(input_nc: int, ndf: int, n_layers: int, actnorm: bool) -> int:
    """Parameters of taming's NLayerDiscriminator, layer by layer: 4x4 convs; a conv followed by a
    norm has a bias only with ActNorm; each norm has 2 parameters per channel (BN weight/bias or
    ActNorm loc/scale)."""
    widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
    count = input_nc * ndf * 16 + ndf  # first conv, with bias, no norm
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        count += c_in * c_out * 16 + (c_out if actnorm else 0) + 2 * c_out
    return count + widths[-1] * 16 + 1  # final 1-channel conv with bias


def test_discriminator_parameter_count_matches_taming():
    default = NLayerDiscriminator()
    assert sum(p.numel() for p in default.parameters()) == _taming_count(3, 64, 3, False) == 2_765_633
    actnorm = NLayerDiscriminator(use_actnorm=True)
    assert sum(p.numel() for p in actnorm.parameters()) == _taming_count(3, 64, 3, True) == 2_766_529
    tiny = NLayerDiscriminator(3, 8, 2)
    assert sum(p.numel() for p in tiny.parameters()) == _taming_count(3, 8, 2, False)
    convs = [m for m in default.main if isinstance(m, torch.nn.Conv2d)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in default.main) == 3
    # taming's state dict names, so CompVis loss.discriminator.* tensors load unchanged.
    assert {k for k in default.state_dict() if k.endswith("weight")} == {
        "main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
        "main.8.weight", "main.9.weight", "main.11.weight"}
    # 70x70 PatchGAN: a 256-px image gives 30x30 logits.
    with torch.no_grad():
        assert default.eval()(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_weights_init_distribution():
    d = NLayerDiscriminator(generator=torch.Generator().manual_seed(0))
    big = d.main[8].weight  # 2M values
    assert big.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    for bn in (d.main[3], d.main[6], d.main[9]):
        assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
        assert 0.01 < bn.weight.std().item() < 0.03
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    bound = 1 / math.sqrt(3 * 16)  # PyTorch's default conv bias bound, kept by taming
    assert d.main[0].bias.abs().max().item() <= bound and d.main[0].bias.std().item() > bound / 4


def test_actnorm_initialises_from_the_first_training_batch():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 8, 2, use_actnorm=True).train()
    norm = d.main[3]
    assert isinstance(norm, ActNorm) and d.main[2].bias is not None
    seen = {}
    # clone: the LeakyReLU after the norm works in place
    norm.register_forward_hook(lambda m, inp, out: seen.update(out=out.detach().clone()))
    d(torch.randn(4, 3, 32, 32) * 3 + 1)
    out = seen["out"].transpose(0, 1).reshape(norm.loc.shape[1], -1)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(out.shape[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std(dim=1), torch.ones(out.shape[0]), rtol=0, atol=1e-4)
    assert norm.initialized.item() == 1
    loc = norm.loc.detach().clone()
    d(torch.randn(4, 3, 32, 32))
    assert torch.equal(norm.loc, loc)  # initialised once
    fresh = NLayerDiscriminator(3, 8, 2, use_actnorm=True).train()
    fresh(torch.randn(2, 3, 32, 32))  # initialised from other data...
    fresh.load_state_dict(d.state_dict())  # ...then restored: the loaded values stay
    fresh(torch.randn(2, 3, 32, 32))
    assert torch.equal(fresh.main[3].loc, loc)
    blank = d.state_dict()
    blank["main.3.initialized"] = torch.tensor(0, dtype=torch.uint8)
    fresh.load_state_dict(blank)  # a not-yet-initialised state initialises on the next batch
    fresh(torch.randn(2, 3, 32, 32) * 5)
    assert not torch.equal(fresh.main[3].loc, loc) and fresh.main[3].initialized.item() == 1


# ---------------------------------------------------------------------------------------------------
# LPIPS backbone loader


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_lpips_backbone_loads_torchvision_vgg16_features(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(123)
    features = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items()
                if k.startswith("features.")}
    path = tmp_path / VGG16_FILE
    torch.save({**features, "classifier.6.bias": torch.zeros(1000)}, path)
    _no_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-trunk warning, no torchvision deprecation noise
        model = build_lpips(str(path))
    slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
    loaded = {}
    for s in slices:
        for name, tensor in s.state_dict().items():
            loaded[f"features.{name}"] = tensor
    assert set(loaded) == {f"features.{i}.{k}" for i in VGG16_CONV_INDICES for k in ("weight", "bias")}
    for key, tensor in loaded.items():
        assert torch.equal(tensor, features[key]), key
    linear = torch.load(ael._lpips_linear_layers_path(), map_location="cpu", weights_only=True)
    for key, tensor in linear.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, x_hat = _images(9)
    with torch.no_grad():
        assert model(x, x).abs().max() < 1e-6 and (model(x, x_hat) > 0).all()


class _Opaque:
    pass


def test_lpips_backbone_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / VGG16_FILE
    with pytest.raises(FileNotFoundError) as err:
        build_lpips(str(missing))
    assert str(missing) in str(err.value) and "loss.lpips_backbone" in str(err.value)
    assert VGG16_URL in str(err.value)

    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError) as err:
        build_lpips(str(wrong))
    assert str(wrong) in str(err.value) and "features.0.weight" in str(err.value)
    assert "26 of 26" in str(err.value)

    shapes = tmp_path / "shapes.pth"
    torch.save({f"features.{i}.{k}": torch.zeros(3) for i in VGG16_CONV_INDICES
                for k in ("weight", "bias")}, shapes)
    with pytest.raises(ValueError, match=re.escape(str(shapes)) + ".*wrong shape.*features.0.weight"):
        build_lpips(str(shapes))

    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ValueError, match=re.escape(str(not_dict)) + ".*holds a list"):
        build_lpips(str(not_dict))

    pickled = tmp_path / "pickled.pth"
    torch.save({"features.0.weight": _Opaque()}, pickled)
    with pytest.raises(ValueError, match=re.escape(str(pickled)) + ".*weights_only=True"):
        build_lpips(str(pickled))


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("key,value,message", [
    ("disc_start", -1, "loss.disc_start=-1: expected an int >= 0"),
    ("disc_start", 2.5, "loss.disc_start=2.5: expected an int >= 0"),
    ("kl_weight", -1e-6, "loss.kl_weight=-1e-06: expected a finite float >= 0.0"),
    ("disc_weight", float("inf"), "loss.disc_weight=inf: expected a finite float >= 0.0"),
    ("logvar_init", float("nan"), "loss.logvar_init=nan: expected a finite float"),
    ("disc_num_layers", 0, "loss.disc_num_layers=0: expected an int >= 1"),
    ("disc_ndf", True, "loss.disc_ndf=True: expected an int >= 1"),
    ("disc_loss", "wgan", "loss.disc_loss='wgan': expected one of hinge, vanilla"),
    ("use_actnorm", "yes", "loss.use_actnorm='yes': expected a bool"),
])
def test_config_validation_messages(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoencoderLossConfig(**{"lpips_random_backbone": True, key: value})


def test_config_lpips_source():
    AutoencoderLossConfig()  # the group is in every job's config: checked only where LPIPS is built
    with pytest.raises(ValueError) as err:
        AutoencoderLossConfig().check_lpips_source()
    for part in ("loss.lpips_backbone", VGG16_FILE, VGG16_URL):
        assert part in str(err.value)
    with pytest.raises(ValueError, match="exactly one"):
        AutoencoderLossConfig(lpips_backbone="/x/" + VGG16_FILE, lpips_random_backbone=True).check_lpips_source()
    with pytest.warns(UserWarning, match="ignored"):
        AutoencoderLossConfig(perceptual_weight=0.0, lpips_backbone="/x/" + VGG16_FILE).check_lpips_source()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = AutoencoderLossConfig(perceptual_weight=0.0)
        assert AutoencoderLoss(cfg).perceptual_loss is None
        AutoencoderLossConfig(lpips_backbone=str(Path("~") / VGG16_FILE))  # existence checked at build


def test_config_validates_through_omegaconf():
    schema = OmegaConf.structured(AutoencoderLossConfig)
    ok = OmegaConf.to_object(OmegaConf.merge(schema, {"lpips_random_backbone": True}))
    assert isinstance(ok, AutoencoderLossConfig) and ok.disc_start == 50001 and ok.disc_weight == 0.5
    with pytest.raises(ValueError, match=re.escape("loss.disc_start=-1: expected an int >= 0")):
        OmegaConf.to_object(OmegaConf.merge(schema, {"lpips_random_backbone": True, "disc_start": -1}))


def test_conv_weight_grad_equals_autograd_on_the_weight():
    from trainer.autoencoder_loss import ConvWeightGrad, adaptive_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1)
    tap = ConvWeightGrad(conv)
    h = torch.randn(2, 6, 9, 7, requires_grad=True)
    y = conv(h)
    loss_a, loss_b = y.pow(2).sum(), (y.sin() * 3).mean()
    for loss in (loss_a, loss_b):
        expected = torch.autograd.grad(loss, conv.weight, retain_graph=True)[0]
        torch.testing.assert_close(tap(loss), expected, rtol=1e-5, atol=1e-6)
    by_weight = adaptive_weight(loss_a, loss_b, conv.weight, 0.5)
    by_tap = adaptive_weight(loss_a, loss_b, tap, 0.5)
    torch.testing.assert_close(by_tap, by_weight, rtol=1e-5, atol=0)
    assert conv.weight.grad is None  # neither path accumulates into the weight
