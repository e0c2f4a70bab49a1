"""The first-stage training objective of the KL autoencoder (Rombach et al., CVPR 2022, Sec. 3.1 and
Appendix G): L1 + LPIPS reconstruction under a learned scalar log-variance, a small KL penalty towards
N(0, I), and a PatchGAN hinge loss with the adaptive weight of Esser et al. (taming transformers,
CVPR 2021, Eq. 7). It follows CompVis ``ldm/modules/losses/contperceptual.py``
(``LPIPSWithDiscriminator``) and taming ``modules/losses/vqperceptual.py``; the differences are stated
where they occur.

The loss holds no optimizer. The autoencoder's optimizer takes the autoencoder's parameters plus
:meth:`AutoencoderLoss.generator_parameters` (the log-variance); a second optimizer takes
:meth:`AutoencoderLoss.discriminator_parameters`. Losses return their logs as detached 0-dim tensors
so that a step does not wait for the device; :func:`logs_to_floats` reads them on logging steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.checks import is_float, is_int
from trainer.models.autoencoder import DiagonalGaussianDistribution
from trainer.models.discriminator import NLayerDiscriminator

DISC_LOSSES = ("hinge", "vanilla")
LPIPS_BACKBONE_KEY = "loss.lpips_backbone"
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the trunk LPIPS v0.1 was calibrated on
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
LPIPS_VERSION = "0.1"
# The convs of torchvision's vgg16().features that lpips' five slices use (lpips/pretrained_networks.py).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
ADAPTIVE_WEIGHT_EPS = 1e-4  # taming/CompVis calculate_adaptive_weight
ADAPTIVE_WEIGHT_MAX = 1e4


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"loss.{key}={value!r}: expected {expected}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not is_int(value, minimum):
        raise _bad(key, value, f"an int >= {minimum}")


def _check_float(key: str, value: Any, minimum: Optional[float] = 0.0) -> None:
    if not is_float(value, minimum):
        raise _bad(key, value, "a finite float" + ("" if minimum is None else f" >= {minimum}"))


@dataclass
class AutoencoderLossConfig:
    """Hydra group ``loss``. Defaults are the paper's KL-f8 recipe (CompVis
    ``configs/autoencoder/autoencoder_kl_32x32x4.yaml``: disc_start 50001, kl_weight 1e-6,
    disc_weight 0.5); ``disc_ndf`` is fixed at 64 in CompVis.

    LPIPS needs torchvision's ImageNet VGG16 weights as a local file (``lpips_backbone``); nothing is
    downloaded. ``lpips_random_backbone`` swaps in a random VGG16 for tests and demos only.
    """

    disc_start: int = 50001  # first global step with the adversarial loss
    kl_weight: float = 1e-6
    pixel_weight: float = 1.0  # L1 weight
    perceptual_weight: float = 1.0  # LPIPS weight; 0 disables LPIPS
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_factor: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_ndf: int = 64
    disc_loss: str = "hinge"
    use_actnorm: bool = False
    logvar_init: float = 0.0
    lpips_backbone: Optional[str] = None  # path to torchvision's vgg16-397923af.pth
    lpips_random_backbone: bool = False

    def __post_init__(self) -> None:
        _check_int("disc_start", self.disc_start, 0)
        for key in ("kl_weight", "pixel_weight", "perceptual_weight", "disc_weight", "disc_factor"):
            _check_float(key, getattr(self, key))
        _check_float("logvar_init", self.logvar_init, minimum=None)
        for key in ("disc_num_layers", "disc_in_channels", "disc_ndf"):
            _check_int(key, getattr(self, key), 1)
        if self.disc_loss not in DISC_LOSSES:
            raise _bad("disc_loss", self.disc_loss, f"one of {', '.join(DISC_LOSSES)}")
        for key in ("use_actnorm", "lpips_random_backbone"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "a bool")
        if self.lpips_backbone is not None and (not isinstance(self.lpips_backbone, str)
                                                or not self.lpips_backbone):
            raise _bad("lpips_backbone", self.lpips_backbone, f"null or the path of {VGG16_FILE}")

    def check_lpips_source(self) -> None:
        """Exactly one LPIPS backbone source when LPIPS is on. Not part of ``__post_init__``: the
        ``loss`` group is in every job's config, and only ``task=autoencoder`` builds LPIPS."""
        has_file = self.lpips_backbone is not None
        if self.perceptual_weight == 0:
            if has_file or self.lpips_random_backbone:
                warnings.warn(f"loss.perceptual_weight=0 disables LPIPS; loss.lpips_backbone="
                              f"{self.lpips_backbone!r} and loss.lpips_random_backbone="
                              f"{self.lpips_random_backbone} are ignored")
            return
        if has_file and self.lpips_random_backbone:
            raise ValueError(f"{LPIPS_BACKBONE_KEY}={self.lpips_backbone!r} and "
                             f"loss.lpips_random_backbone=True: expected exactly one of them")
        if not has_file and not self.lpips_random_backbone:
            raise ValueError(
                f"{LPIPS_BACKBONE_KEY}=None with loss.perceptual_weight={self.perceptual_weight}: "
                f"expected the path of torchvision's ImageNet VGG16 weights {VGG16_FILE} (download it "
                f"from {VGG16_URL}), or loss.perceptual_weight=0 to train without LPIPS "
                f"(loss.lpips_random_backbone=True gives a random VGG16, for tests only)")


# ---------------------------------------------------------------------------------------------------
# LPIPS


def _lpips_linear_layers_path() -> Path:
    # Imported here: lpips pulls in torchvision's model zoo; only LPIPS needs it.
    import lpips

    return Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / "vgg.pth"


def _read_vgg16_state(path: Path) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 state dict from ``path``, checked for every conv of ``features``."""
    if not path.is_file():
        raise FileNotFoundError(f"{LPIPS_BACKBONE_KEY}={str(path)!r}: no such file; expected "
                                f"torchvision's ImageNet VGG16 weights {VGG16_FILE} ({VGG16_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises several types; all mean "cannot read this file"
        raise ValueError(f"{LPIPS_BACKBONE_KEY}={str(path)!r} cannot be read with "
                         f"torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{LPIPS_BACKBONE_KEY}={str(path)!r} holds a {type(state).__name__}; "
                         f"expected torchvision's VGG16 state dict ({VGG16_FILE})")
    wanted = [f"features.{i}.{kind}" for i in VGG16_CONV_INDICES for kind in ("weight", "bias")]
    missing = [key for key in wanted if not isinstance(state.get(key), torch.Tensor)]
    if missing:
        raise ValueError(f"{LPIPS_BACKBONE_KEY}={str(path)!r} is not torchvision's VGG16 state dict "
                         f"({VGG16_FILE}): {len(missing)} of {len(wanted)} backbone tensors are "
                         f"missing: {', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}")
    return state


def _load_trunk(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``features.N.*`` into lpips' ``sliceK.N.*`` (lpips keeps torchvision's layer index)."""
    target = net.state_dict()
    trunk = {key: state["features." + key.split(".", 1)[1]] for key in target}
    wrong = [f"features.{key.split('.', 1)[1]}: {tuple(trunk[key].shape)} vs {tuple(target[key].shape)}"
             for key in target if trunk[key].shape != target[key].shape]
    if wrong:
        raise ValueError(f"{LPIPS_BACKBONE_KEY}={str(path)!r} is not torchvision's VGG16 state dict "
                         f"({VGG16_FILE}): tensors of the wrong shape: {'; '.join(wrong[:8])}")
    net.load_state_dict(trunk, strict=True)


def build_lpips(backbone: Optional[str] = None, *, random_backbone: bool = False) -> nn.Module:
    """LPIPS v0.1 with a VGG16 trunk (Zhang et al., CVPR 2018), frozen and in eval mode.

    The trunk comes from ``backbone`` (torchvision's ``vgg16-397923af.pth``, the trunk the
    CompVis/taming LPIPS uses), or stays random with ``random_backbone`` (tests and demos; drawn from
    the global RNG). The calibrated linear layers ship inside the ``lpips`` package. Both are read with
    ``torch.load(weights_only=True)`` here rather than by lpips, and lpips is built with
    ``pnet_rand=True`` so torchvision never tries to download anything.
    """
    if (backbone is None) == (not random_backbone):
        raise ValueError(f"{LPIPS_BACKBONE_KEY}={backbone!r} and loss.lpips_random_backbone={random_backbone}: "
                         f"expected exactly one of them")
    # Imported here: lpips pulls in torchvision's model zoo, which only the autoencoder job and
    # eval.reconstruction need.
    import lpips

    state: dict[str, torch.Tensor] = {}
    if not random_backbone:
        # Read the file before building the network so that a wrong path fails at once.
        backbone_path = Path(backbone).expanduser()
        state = _read_vgg16_state(backbone_path)
    with warnings.catch_warnings():
        # lpips calls torchvision.models.vgg16(pretrained=False), a deprecated spelling of weights=None.
        warnings.filterwarnings("ignore", message=r".*'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Arguments other than a weight enum",
                                category=UserWarning)
        model = lpips.LPIPS(net="vgg", version=LPIPS_VERSION, pretrained=False, pnet_rand=True,
                            verbose=False)
    linear_path = _lpips_linear_layers_path()
    linear = torch.load(linear_path, map_location="cpu", weights_only=True)
    expected_linear = {f"lin{i}.model.1.weight" for i in range(len(model.chns))}
    if set(linear) != expected_linear:
        raise ValueError(f"lpips package file {linear_path} holds {sorted(linear)}; expected "
                         f"{sorted(expected_linear)} (is the lpips package intact?)")
    # strict=False: the trunk (net.*) is loaded below, and lins.N are aliases of linN.
    model.load_state_dict(linear, strict=False)
    if random_backbone:
        warnings.warn("loss.lpips_random_backbone=True: LPIPS runs on a randomly initialised VGG16; "
                      "its perceptual term is not the paper's (for tests and demos only)")
    else:
        _load_trunk(model.net, state, backbone_path)
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------
# Pure loss terms (taming modules/losses/vqperceptual.py)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN loss of the discriminator: 0.5 * (mean(softplus(-D(x))) +
    mean(softplus(D(x_hat)))) (Goodfellow et al. 2014)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSS_FUNCTIONS = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight: float, global_step: int, threshold: int) -> float:
    """``weight``, or 0 while ``global_step < threshold`` (taming/CompVis ``adopt_weight``)."""
    return 0.0 if global_step < threshold else weight


class ConvWeightGrad:
    """The gradient of a loss w.r.t. a conv layer's weight, computed from the layer's recorded input
    and the loss's gradient at the layer's output (``torch.nn.grad.conv2d_weight``), without
    differentiating to the weight itself.

    Equal to ``autograd.grad(loss, conv.weight)``, but autograd stops at the layer's output, so the
    weight's gradient hooks (DeepSpeed ZeRO's reduce hooks) do not fire for this side computation.
    Attach it to ``decoder.conv_out``; each forward records the latest input and output.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self.handle = conv.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.input, self.output = args[0], output

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if self.output is None or not self.output.requires_grad:
            raise RuntimeError("ConvWeightGrad: the layer has not run with gradients since it was attached")
        grad_out = torch.autograd.grad(loss, self.output, retain_graph=True)[0]
        c = self.conv
        return torch.nn.grad.conv2d_weight(self.input, c.weight.shape, grad_out, stride=c.stride,
                                           padding=c.padding, dilation=c.dilation, groups=c.groups)


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor,
                    last_layer: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                    disc_weight: float) -> torch.Tensor:
    """Esser et al. 2021, Eq. 7: ||grad nll|| / (||grad g|| + 1e-4) w.r.t. the decoder's last layer,
    clamped to [0, 1e4], detached, times ``disc_weight``. Both graphs are retained for backward.

    ``last_layer``: the weight tensor, or a function loss -> its gradient (``ConvWeightGrad``)."""
    if callable(last_layer) and not isinstance(last_layer, torch.Tensor):
        nll_grad, g_grad = last_layer(nll_loss), last_layer(g_loss)
    else:
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grad) / (torch.norm(g_grad) + ADAPTIVE_WEIGHT_EPS)
    return torch.clamp(weight, 0.0, ADAPTIVE_WEIGHT_MAX).detach() * disc_weight


def logs_to_floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Read a loss's logs back to the host in one transfer (call on logging steps only)."""
    if not logs:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in logs.values()]).tolist()
    return dict(zip(logs, values))


# ---------------------------------------------------------------------------------------------------
# The module


class AutoencoderLoss(nn.Module):
    """CompVis ``LPIPSWithDiscriminator`` split into a generator and a discriminator objective.

    Holds the frozen LPIPS net (``perceptual_loss``, the CompVis attribute name), the patch
    discriminator (``discriminator``) and the learned scalar log-variance (``logvar``) of the
    reconstruction likelihood. ``generator`` seeds the discriminator's init (global RNG when None).
    """

    def __init__(self, cfg: AutoencoderLossConfig, *, generator: Optional[torch.Generator] = None
                 ) -> None:
        super().__init__()
        self.disc_start = cfg.disc_start
        self.kl_weight = cfg.kl_weight
        self.pixel_weight = cfg.pixel_weight
        self.perceptual_weight = cfg.perceptual_weight
        self.disc_weight = cfg.disc_weight
        self.disc_factor = cfg.disc_factor
        cfg.check_lpips_source()
        self.perceptual_loss = (build_lpips(cfg.lpips_backbone, random_backbone=cfg.lpips_random_backbone)
                                if cfg.perceptual_weight else None)
        # Shape (1,), not CompVis' 0-d scalar: DeepSpeed broadcasts parameters as byte views, which a
        # 0-d tensor cannot give.
        self.logvar = nn.Parameter(torch.full((1,), float(cfg.logvar_init)))
        self.discriminator = NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_num_layers,
                                                 cfg.use_actnorm, generator=generator)
        self.d_loss = D_LOSS_FUNCTIONS[cfg.disc_loss]

    def train(self, mode: bool = True) -> "AutoencoderLoss":
        # LPIPS stays in eval mode: its linear layers carry Dropout(0.5). (CompVis builds LPIPS with
        # .eval() but Lightning's model.train() turns that dropout back on during training.)
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trained with the autoencoder's optimizer (CompVis adds ``loss.logvar`` to opt_ae)."""
        return [self.logvar]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def disc_active(self, global_step: int) -> bool:
        """Whether the adversarial terms count at ``global_step``; when not, skip the
        discriminator's backward and optimizer step."""
        return adopt_weight(self.disc_factor, global_step, self.disc_start) > 0

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        # The generator's adversarial loss must not leave gradients on the discriminator: run it with
        # detached copies of its parameters, so gradients reach the images only. (Lightning's
        # toggle_optimizer achieves this in CompVis by switching requires_grad off.)
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (self._as_disc_input(images),)).float()

    def _as_disc_input(self, images: torch.Tensor) -> torch.Tensor:
        # Under DeepSpeed bf16 the discriminator's weights are bf16; the losses stay in fp32.
        return images.contiguous().to(next(self.discriminator.parameters()).dtype)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       posterior: DiagonalGaussianDistribution, global_step: int,
                       last_layer: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss: nll + kl_weight * kl + d_weight * disc_factor * g_loss.

        ``inputs``/``reconstructions`` are (B, C, H, W) in [-1, 1]; ``last_layer`` is the decoder's
        last weight (``decoder.conv_out.weight``), needed in training mode once the discriminator is
        active. Before ``disc_start`` the discriminator is not run at all and d_weight is 0; CompVis
        runs it and multiplies its term by 0, which gives the same gradient. In eval mode the adaptive
        weight is 0, as in CompVis (it needs gradients).
        """
        l1 = (inputs - reconstructions).abs()  # (B, C, H, W)
        # CompVis ignores pixelloss_weight; here it scales the L1 term (1.0 reproduces CompVis).
        rec = self.pixel_weight * l1
        p_loss = l1.new_zeros(())
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())  # (B,1,1,1)
            # Broadcast onto every pixel as CompVis does: summed below, LPIPS counts C*H*W times.
            rec = rec + self.perceptual_weight * p_loss
        nll = rec / torch.exp(self.logvar) + self.logvar  # (B, C, H, W)
        nll_loss = nll.sum() / nll.shape[0]
        kl = posterior.kl()  # (B,)
        kl_loss = kl.sum() / kl.shape[0]
        loss = nll_loss + self.kl_weight * kl_loss

        disc_factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        g_loss = d_weight = nll_loss.new_zeros(())
        if disc_factor > 0:
            g_loss = -self._frozen_discriminator(reconstructions.contiguous()).mean()
            if self.training:
                if last_layer is None:
                    raise ValueError("AutoencoderLoss.generator_loss: last_layer=None; the adaptive "
                                     "weight needs the decoder's last weight (decoder.conv_out.weight)")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.disc_weight)
            loss = loss + d_weight * disc_factor * g_loss

        logs = {"total": loss, "logvar": self.logvar[0], "kl": kl_loss, "nll": nll_loss,
                "rec": rec.mean(), "l1": l1.mean(), "lpips": p_loss.mean(), "d_weight": d_weight,
                "disc_factor": nll_loss.new_full((), disc_factor), "g_loss": g_loss}
        return loss, {k: v.detach().to(loss.device, torch.float32) for k, v in logs.items()}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor * d_loss(D(x), D(x_hat)) on detached images.

        Before ``disc_start`` the discriminator is not run: the loss is a constant 0 without a graph
        and the caller skips the discriminator's backward and step (see :meth:`disc_active`). CompVis
        steps its optimizer on zero gradients there, which leaves the weights unchanged but advances
        Adam's step count and BatchNorm's running statistics.
        """
        disc_factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        zero = inputs.new_zeros((), dtype=torch.float32)
        if disc_factor == 0:
            return zero, {"disc_loss": zero, "logits_real": zero, "logits_fake": zero,
                          "disc_active": zero}
        # Two passes, not one concatenated batch: BatchNorm statistics per pass, as in CompVis.
        logits_real = self.discriminator(self._as_disc_input(inputs.detach())).float()  # (B, 1, h, w)
        logits_fake = self.discriminator(self._as_disc_input(reconstructions.detach())).float()
        d_loss = disc_factor * self.d_loss(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(),
                "logits_fake": logits_fake.mean(), "disc_active": zero + 1.0}
        return d_loss, {k: v.detach().float() for k, v in logs.items()}
