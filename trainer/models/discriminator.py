"""The patch discriminator of the first-stage GAN loss: pix2pix's PatchGAN (Isola et al., CVPR 2017)
as taming-transformers builds it (``taming/modules/discriminator/model.py``), which CompVis
``LPIPSWithDiscriminator`` trains against the KL autoencoder (Rombach et al., CVPR 2022, Appendix G).

Module names follow taming (``main.0.weight``, ...; ActNorm ``loc``/``scale``/``initialized``) so the
``loss.discriminator.*`` tensors of a CompVis autoencoder training checkpoint load unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

KERNEL_SIZE = 4
PADDING = 1
LEAKY_SLOPE = 0.2
MAX_WIDTH_MULT = 8  # pix2pix caps the width at 8 * ndf
INIT_STD = 0.02  # DCGAN init (Radford et al. 2016), used by pix2pix and taming


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` whose first training batch sets ``loc = -mean`` and
    ``scale = 1 / (std + 1e-6)`` (Glow, Kingma & Dhariwal 2018; taming ``modules/util.py``).

    The ``initialized`` buffer travels with the state dict, so a resumed run does not re-initialise.
    Under data parallelism each replica initialises from its own batch; broadcast the parameters
    afterwards if the replicas must agree.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        # Python-side copy of ``initialized`` so steady-state training does not read the buffer
        # back from the device every call; cleared whenever a state dict is loaded.
        self._initialized_seen = False

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        self.loc.copy_(-flat.mean(dim=1).view(1, -1, 1, 1))
        self.scale.copy_(1.0 / (flat.std(dim=1).view(1, -1, 1, 1) + 1e-6))  # unbiased std, as taming

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._initialized_seen = False
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._initialized_seen:
            if self.initialized.item() == 0:  # one host sync, until the first training batch
                self._initialize(x)
                self.initialized.fill_(1)
            self._initialized_seen = True
        return self.scale * (x + self.loc)


def weights_init(module: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """DCGAN init (taming ``weights_init``): conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02),
    bias 0. ActNorm keeps its values, as in taming. Use with ``Module.apply``.

    taming leaves conv biases at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); they are
    redrawn here from that same distribution so that ``generator`` alone fixes the whole init.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD, generator=generator)
        if module.bias is not None:
            bound = 1.0 / math.sqrt(module.weight[0].numel())  # fan_in = C_in * kh * kw
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD, generator=generator)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: one logit per overlapping receptive field (70x70 px for ``n_layers=3``).

    conv(stride 2) + LeakyReLU, ``n_layers - 1`` blocks of conv(stride 2) + norm + LeakyReLU, one
    conv(stride 1) + norm + LeakyReLU block, and a 1-channel conv(stride 1); widths ndf * min(2^n, 8).
    Convs followed by BatchNorm have no bias (the norm's shift replaces it); with ActNorm they keep
    one, as taming's ``use_bias = norm_layer != nn.BatchNorm2d`` does.

    The constructor applies :func:`weights_init`, drawing from ``generator`` when given, otherwise
    from the global RNG (seed it before building for a reproducible init).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False,
                 *, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        for name, value in (("input_nc", input_nc), ("ndf", ndf), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NLayerDiscriminator: {name}={value!r}; expected an int >= 1")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, KERNEL_SIZE, stride=stride, padding=PADDING, bias=use_bias),
                    norm(c_out), nn.LeakyReLU(LEAKY_SLOPE, True)]

        widths = [ndf * min(2**n, MAX_WIDTH_MULT) for n in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, KERNEL_SIZE, stride=2, padding=PADDING),
                                   nn.LeakyReLU(LEAKY_SLOPE, True)]
        for n in range(1, n_layers):
            layers += block(widths[n - 1], widths[n], stride=2)
        layers += block(widths[n_layers - 1], widths[n_layers], stride=1)
        layers.append(nn.Conv2d(widths[n_layers], 1, KERNEL_SIZE, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)
        self.apply(lambda m: weights_init(m, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, input_nc, H, W) -> (B, 1, h, w) patch logits
