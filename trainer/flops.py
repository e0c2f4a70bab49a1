"""Analytical FLOPs per sample of the networks, as pure functions of their configs.

What is counted is what ``torch.utils.flop_counter.FlopCounterMode`` counts and what MFU is defined on
(Chowdhery et al. 2022, PaLM, App. B: "model FLOPs"): the multiply-adds of convolutions, linear layers
and attention's two batched matmuls, 2 FLOPs each. Norms, activations, softmax and elementwise ops are
not counted (they are a few percent, and memory-bound). One sample's numbers, for one image of
``height x width`` latent (or image) pixels.

Backward is two matmuls per forward matmul (the gradient of the input and of the weight), except where
autograd skips the input's gradient because nothing upstream needs it: the UNet's first convolution and
time embedding, and the cross-attention key/value projections of a frozen (precomputed) text context.
Attention's backward is counted as its four matmuls (the math backend); fused kernels that recompute
the scores (flash attention) do more work, which MFU by definition does not credit. Activation
checkpointing recomputes the forward of each checkpointed block during backward, up to the last tensor
backward needs (torch's non-reentrant checkpoint stops early, so a block's last matmul is not rerun):
``recompute`` holds those FLOPs (hardware FLOPs = model FLOPs + recompute); MFU uses model FLOPs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.models.autoencoder import AutoencoderConfig
from trainer.models.text_encoders import TextEncoderConfig, open_clip_model_config
from trainer.models.unet import UNetConfig

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity): A100 SXM/PCIe 312,
# H100 SXM and H200 989 (H100 PCIe 756), L40S 362, A10 125, V100 (fp16 tensor cores) 125.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H100 PCIE": 756.0, "L40S": 362.0,
               "A10": 125.0, "V100": 125.0}
PLAN_DEVICES = ("A100", "H100", "H200")


def peak_tflops_for(device_name: str) -> float | None:
    """The bf16 peak of a device from its name (``torch.cuda.get_device_name``, e.g. "NVIDIA H100 80GB
    HBM3"), or None when the table does not know it (the CPU, an unlisted GPU)."""
    name = device_name.upper()
    # Longest key first, so "H100 PCIE" wins over "H100".
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


@dataclass(frozen=True)
class Flops:
    """FLOPs of one sample: forward, backward and the forward recomputed by activation checkpointing."""

    forward: int = 0
    backward: int = 0
    recompute: int = 0

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.forward + other.forward, self.backward + other.backward,
                     self.recompute + other.recompute)

    @property
    def model(self) -> int:
        """Forward + backward: the FLOPs MFU counts."""
        return self.forward + self.backward

    @property
    def hardware(self) -> int:
        """What is executed, recomputation included."""
        return self.forward + self.backward + self.recompute

    def checkpointed(self, enabled: bool, last: "Flops") -> "Flops":
        """This block's FLOPs with its forward recomputed in backward when ``enabled``, except ``last``,
        its last matmul (non-reentrant checkpointing stops once backward's saved tensors are back)."""
        extra = self.forward - last.forward if enabled else 0
        return Flops(self.forward, self.backward, self.recompute + extra)

    def frozen(self) -> "Flops":
        """Forward only (no gradient flows: a frozen network under no_grad)."""
        return Flops(self.forward, 0, 0)


def _matmul(tokens: int, d_in: int, d_out: int, *, input_grad: bool = True) -> Flops:
    """A linear layer (or 1x1 conv) over ``tokens`` positions."""
    f = 2 * tokens * d_in * d_out
    return Flops(f, f * (2 if input_grad else 1))


def _conv(c_in: int, c_out: int, kernel: int, out_pixels: int, *, input_grad: bool = True) -> Flops:
    return _matmul(out_pixels, c_in * kernel * kernel, c_out, input_grad=input_grad)


def _attention(queries: int, keys: int, heads: int, dim_head: int) -> Flops:
    """softmax(Q K^T) V: two matmuls forward, four backward."""
    f = 4 * queries * keys * heads * dim_head
    return Flops(f, 2 * f)


# ---------------------------------------------------------------------------------------------------
# UNet


def _unet_resblock(c_in: int, c_out: int, emb: int, pixels: int, checkpointed: bool) -> Flops:
    last = _conv(c_out, c_out, 3, pixels)
    flops = _conv(c_in, c_out, 3, pixels) + _matmul(1, emb, c_out) + last
    if c_in != c_out:
        last = _conv(c_in, c_out, 1, pixels)  # the skip projection runs after the residual branch
        flops += last
    return flops.checkpointed(checkpointed, last)


def _unet_self_attention(cfg: UNetConfig, channels: int, pixels: int, checkpointed: bool) -> Flops:
    """The unconditional UNet's ``AttentionBlock``: qkv, attention over the pixels, proj_out."""
    heads, dim_head = cfg.heads_and_dim(channels)
    proj_out = _matmul(pixels, channels, channels)
    flops = _matmul(pixels, channels, 3 * channels) + _attention(pixels, pixels, heads, dim_head) + proj_out
    return flops.checkpointed(checkpointed, proj_out)


def _unet_transformer(cfg: UNetConfig, channels: int, pixels: int, context_len: int, context_grad: bool,
                      checkpointed: bool) -> Flops:
    if cfg.context_dim is None:
        return _unet_self_attention(cfg, channels, pixels, checkpointed)
    heads, dim_head = cfg.heads_and_dim(channels)
    inner = heads * dim_head
    proj_out = _matmul(pixels, inner, channels)
    flops = _matmul(pixels, channels, inner) + proj_out
    for _ in range(cfg.transformer_depth):
        flops += _matmul(pixels, inner, 3 * inner) + _attention(pixels, pixels, heads, dim_head)  # attn1 q, k, v
        flops += _matmul(pixels, inner, inner)  # attn1 out
        flops += _matmul(pixels, inner, inner) + _matmul(pixels, inner, inner)  # attn2 q, out
        flops += _matmul(context_len, cfg.context_dim, 2 * inner, input_grad=context_grad)  # attn2 k, v
        flops += _attention(pixels, context_len, heads, dim_head)
        flops += _matmul(pixels, inner, 8 * inner) + _matmul(pixels, 4 * inner, inner)  # GEGLU, out
    return flops.checkpointed(checkpointed, proj_out)


def unet_flops(cfg: UNetConfig, height: int, width: int, context_len: int, *, context_grad: bool = False,
               checkpointing: str = "none") -> Flops:
    """One sample through ``UNetModel(cfg)`` on a ``height x width`` latent with ``context_len`` context
    tokens; ``context_grad``: the context needs a gradient (a jointly trained text encoder);
    ``checkpointing``: ``deepspeed.activation_checkpointing`` (none, res, transformer, all)."""
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if height % factor or width % factor:
        raise ValueError(f"latent {height}x{width} is not divisible by {factor} (2 ** (len(channel_mult) - 1))")
    res_ac = checkpointing in ("res", "all")
    attn_ac = checkpointing in ("transformer", "all")
    emb = 4 * cfg.model_channels

    def res(c_in: int, c_out: int, pixels: int) -> Flops:
        return _unet_resblock(c_in, c_out, emb, pixels, res_ac)

    def attn(channels: int, pixels: int) -> Flops:
        return _unet_transformer(cfg, channels, pixels, context_len, context_grad, attn_ac)

    # The time embedding and the first conv: their inputs need no gradient.
    flops = _matmul(1, cfg.model_channels, emb, input_grad=False) + _matmul(1, emb, emb)
    flops += _conv(cfg.in_channels, cfg.model_channels, 3, height * width, input_grad=False)
    ch = cfg.model_channels
    skips = [ch]
    num_levels = len(cfg.channel_mult)
    for level, (out_ch, ds) in enumerate(zip(cfg.level_channels, cfg.downsample_factors)):
        pixels = (height // ds) * (width // ds)
        for _ in range(cfg.num_res_blocks):
            flops += res(ch, out_ch, pixels)
            ch = out_ch
            if ds in cfg.attention_resolutions:
                flops += attn(ch, pixels)
            skips.append(ch)
        if level != num_levels - 1:
            flops += _conv(ch, ch, 3, pixels // 4)  # Downsample: stride 2
            skips.append(ch)
    pixels = (height // factor) * (width // factor)
    flops += res(ch, ch, pixels) + attn(ch, pixels) + res(ch, ch, pixels)
    for level in reversed(range(num_levels)):
        out_ch, ds = cfg.level_channels[level], cfg.downsample_factors[level]
        pixels = (height // ds) * (width // ds)
        for i in range(cfg.num_res_blocks + 1):
            flops += res(ch + skips.pop(), out_ch, pixels)
            ch = out_ch
            if ds in cfg.attention_resolutions:
                flops += attn(ch, pixels)
            if level and i == cfg.num_res_blocks:
                flops += _conv(ch, ch, 3, pixels * 4)  # Upsample: nearest x2, then 3x3
    return flops + _conv(ch, cfg.out_channels, 3, height * width)


# ---------------------------------------------------------------------------------------------------
# Text encoders


def _transformer_layer(length: int, width: int, heads: int, dim_head: int, ff_width: int,
                       checkpointed: bool = False) -> Flops:
    inner = heads * dim_head
    last = _matmul(length, ff_width, width)
    flops = (_matmul(length, width, 3 * inner) + _attention(length, length, heads, dim_head)
             + _matmul(length, inner, width) + _matmul(length, width, ff_width) + last)
    return flops.checkpointed(checkpointed, last)


def text_encoder_flops(cfg: TextEncoderConfig, *, checkpointing: bool = False) -> Flops:
    """One prompt (``max_length`` tokens) through the text encoder; forward only when it is frozen.
    ``checkpointing``: every layer recomputed in backward."""
    length = cfg.max_length
    if cfg.kind == "ldm_bert":
        layer = _transformer_layer(length, cfg.width, cfg.num_heads, cfg.dim_head, cfg.width * cfg.ff_mult,
                                   checkpointing and cfg.trainable)
        # The first layer's input is the embeddings' output, which needs a gradient (the tables train).
        total = Flops()
        for _ in range(cfg.depth):
            total += layer
        return total if cfg.trainable else total.frozen()
    text = open_clip_model_config(cfg.arch)["text_cfg"]
    width, heads = text["width"], text["heads"]
    depth = text["layers"] - (1 if cfg.layer == "penultimate" else 0)
    ff = int(width * text.get("mlp_ratio", 4.0))
    layer = _transformer_layer(length, width, heads, width // heads, ff)
    total = Flops()
    for _ in range(depth):
        total += layer
    return total.frozen()


# ---------------------------------------------------------------------------------------------------
# First stage


def _ae_resblock(c_in: int, c_out: int, pixels: int) -> Flops:
    flops = _conv(c_in, c_out, 3, pixels) + _conv(c_out, c_out, 3, pixels)
    return flops + _conv(c_in, c_out, 1, pixels) if c_in != c_out else flops


def _ae_attn(channels: int, pixels: int) -> Flops:
    return _matmul(pixels, channels, 4 * channels) + _attention(pixels, pixels, 1, channels)


def first_stage_flops(cfg: AutoencoderConfig, height: int, width: int) -> tuple[Flops, Flops]:
    """(encode, decode) of one ``height x width`` image through the KL (or VQ) autoencoder, forward only (the
    first stage is frozen while the diffusion model trains); zero for the identity first stage.
    Attention sits where CompVis puts it: at the levels whose *config* resolution is listed."""
    if cfg.kind == "identity":
        return Flops(), Flops()
    num_levels = len(cfg.ch_mult)
    in_mult = (1, *cfg.ch_mult)
    enc = _conv(cfg.in_channels, cfg.ch, 3, height * width)
    h, w = height, width
    for i, mult in enumerate(cfg.ch_mult):
        c_in, c_out = cfg.ch * in_mult[i], cfg.ch * mult
        for _ in range(cfg.num_res_blocks):
            enc += _ae_resblock(c_in, c_out, h * w)
            c_in = c_out
            if cfg.resolution // 2 ** i in cfg.attn_resolutions:
                enc += _ae_attn(c_out, h * w)
        if i != num_levels - 1:
            h, w = h // 2, w // 2
            enc += _conv(c_out, c_out, 3, h * w)
    top = cfg.ch * cfg.ch_mult[-1]
    mid = _ae_resblock(top, top, h * w) + _ae_attn(top, h * w) + _ae_resblock(top, top, h * w)
    moments = 1 if cfg.kind == "vq" else 2  # a VQ encoder emits the latent, a KL one its mean and log-variance
    enc += (mid + _conv(top, moments * cfg.z_channels, 3, h * w)
            + _conv(moments * cfg.z_channels, moments * cfg.embed_dim, 1, h * w))

    dec = _conv(cfg.embed_dim, cfg.z_channels, 1, h * w) + _conv(cfg.z_channels, top, 3, h * w) + mid
    if cfg.kind == "vq":  # nearest code: the distance matmul against the codebook
        dec += _matmul(h * w, cfg.embed_dim, cfg.n_embed, input_grad=False)
    c_in = top
    for i in reversed(range(num_levels)):
        c_out = cfg.ch * cfg.ch_mult[i]
        for _ in range(cfg.num_res_blocks + 1):
            dec += _ae_resblock(c_in, c_out, h * w)
            c_in = c_out
            if cfg.resolution // 2 ** i in cfg.attn_resolutions:
                dec += _ae_attn(c_out, h * w)
        if i != 0:
            h, w = h * 2, w * 2
            dec += _conv(c_out, c_out, 3, h * w)
    dec += _conv(c_in, cfg.out_ch, 3, h * w)
    return enc.frozen(), dec.frozen()


# ---------------------------------------------------------------------------------------------------
# A training step


@dataclass(frozen=True)
class TrainingFlops:
    """Per sample of one training step, by component."""

    unet: Flops
    text_encoder: Flops
    first_stage: Flops

    @property
    def total(self) -> Flops:
        return self.unet + self.text_encoder + self.first_stage


def diffusion_training_flops(unet: UNetConfig, text_encoder: Optional[TextEncoderConfig], autoencoder: AutoencoderConfig,
                             height: int, width: int | None = None, *, cached_latents: bool, cached_text: bool = False,
                             checkpointing: str = "none") -> TrainingFlops:
    """One sample of a text-to-image training step on a ``height x width`` image (``width`` defaults to
    ``height``): the UNet forward and backward, the text encoder (forward and backward when trained
    jointly, forward when frozen, nothing when its outputs are cached) and the first stage's encoder
    (nothing when training from a latent cache). ``text_encoder=None``: a class-conditional (one
    context token from an embedding lookup) or unconditional UNet (``unet.context_dim=None``)."""
    width = height if width is None else width
    f = autoencoder.downsample_factor
    if height % f or width % f:
        raise ValueError(f"image {height}x{width} is not divisible by the first stage's downsampling {f}")
    if text_encoder is None:
        u = unet_flops(unet, height // f, width // f, 0 if unet.context_dim is None else 1,
                       checkpointing=checkpointing)
        first = Flops() if cached_latents else first_stage_flops(autoencoder, height, width)[0]
        return TrainingFlops(unet=u, text_encoder=Flops(), first_stage=first)
    text_grad = text_encoder.kind == "ldm_bert" and text_encoder.trainable
    u = unet_flops(unet, height // f, width // f, text_encoder.max_length, context_grad=text_grad,
                   checkpointing=checkpointing)
    if cached_text and not text_grad:
        text = Flops()
    else:
        text = text_encoder_flops(text_encoder, checkpointing=False)
    first = Flops() if cached_latents else first_stage_flops(autoencoder, height, width)[0]
    return TrainingFlops(unet=u, text_encoder=text, first_stage=first)


def images_per_second(flops_per_image: float, peak_tflops: float, mfu: float) -> float:
    """Images/s one device reaches at ``mfu`` of ``peak_tflops`` when an image costs ``flops_per_image``."""
    return mfu * peak_tflops * 1e12 / flops_per_image
