"""Cross-attention transformer of the latent diffusion UNet (Rombach et al., CVPR 2022, Sec. 3.3).

Module and parameter names follow CompVis ``ldm/modules/attention.py`` (latent-diffusion and
Stability-AI/stablediffusion), so CompVis checkpoints load unchanged: ``SpatialTransformer.norm``,
``proj_in``, ``transformer_blocks.{i}.{norm1,attn1,norm2,attn2,norm3,ff}``, ``proj_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back, as CompVis ``GroupNorm32``: the variance of a
    bf16/fp16 activation over a whole group loses too many bits otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        # Upcast the affine parameters too, so a bf16 model without autocast works as well as
        # bf16 activations under autocast (where group_norm already runs in fp32).
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context`` is None).

    q/k/v projections carry no bias (CompVis); the scale is ``dim_head ** -0.5``, the SDPA default.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, num_queries, _ = x.shape  # (B, N, C)
        context = x if context is None else context  # (B, L, C_ctx)
        # (B, N, H*D) -> (B, H, N, D): views only, SDPA takes the strided layout as is.
        q = self.to_q(x).view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(context).view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        v = self.to_v(context).view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(batch, num_queries, self.heads * self.dim_head)
        return self.to_out(out)  # (B, N, C)


class _GEGLUProduct(torch.autograd.Function):
    """``a * gelu(gate)`` for ``a, gate = h.chunk(2, -1)``, saving only ``h``.

    Autograd on the plain expression also keeps ``gelu(gate)``: one (B, N, 4C) tensor per
    transformer block, the largest activation of the feed-forward. Backward recomputes it, one
    elementwise pass next to the (B, N, C) x (C, 8C) projection. (Writing the two gradient halves
    into one buffer with ``out=`` would save the concatenation, but torch.compile cannot trace
    ``out=`` into a strided view.)
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        a, gate = h.chunk(2, dim=-1)
        grad_a = grad_out * F.gelu(gate)
        # d/dg [g * Phi(g)] for the exact (erf) GELU used in forward.
        grad_gate = torch.ops.aten.gelu_backward(grad_out * a, gate)
        return torch.cat([grad_a, grad_gate], dim=-1)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, "GLU Variants Improve Transformer"), CompVis ``GEGLU``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (B, N, 2 dim_out): [value, gate]
        if torch.is_grad_enabled() and h.requires_grad:
            return _GEGLUProduct.apply(h)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)  # (B, N, dim_out)


class FeedForward(nn.Module):
    """``net = [GEGLU(dim, 4 dim), Dropout, Linear(4 dim, dim)]`` (CompVis names ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x  # (B, N, C)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` by cross-attention.

    ``use_linear=False`` is SD v1 (1x1 conv ``proj_in``/``proj_out``, weights (O, I, 1, 1));
    ``use_linear=True`` is SD v2 (Linear projections applied after flattening). The output
    projection starts at zero (CompVis ``zero_module``), so the block starts as the identity.
    """

    def __init__(self, in_channels: int, num_heads: int, dim_head: int, context_dim: int,
                 depth: int = 1, dropout: float = 0.0, use_linear: bool = False,
                 norm_num_groups: int = 32) -> None:
        super().__init__()
        inner_dim = num_heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(norm_num_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, num_heads, dim_head, context_dim, dropout=dropout)
            for _ in range(depth))
        if use_linear:
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        for p in self.proj_out.parameters():
            p.detach().zero_()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape  # (B, C, H, W)
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        inner = h.shape[1]
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, inner)  # (B, HW, inner)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)  # (B, HW, C)
            # Left as a strided (B, C, H, W) view: the residual add below writes its result in
            # x's layout, so CompVis' extra contiguous copy is not needed.
            return x + h.view(batch, height, width, channels).permute(0, 3, 1, 2)
        h = h.view(batch, height, width, inner).permute(0, 3, 1, 2)  # (B, inner, H, W)
        # Already channels_last in memory; copy only when x (and so the model) is NCHW.
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        h = h.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return x + self.proj_out(h)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map, without context: the attention of CompVis'
    unconditional UNets (``ldm/modules/diffusionmodules/openaimodel.py`` ``AttentionBlock`` with
    ``QKVAttentionLegacy``, the default ``use_new_attention_order=False``), built where a conditional
    UNet has a ``SpatialTransformer``. Parameters: ``norm``, ``qkv`` (a 1x1 conv1d to 3C channels,
    head-major: head ``h`` owns rows ``[3 h D, 3 (h+1) D)`` as its q, k, v), ``proj_out`` (starts at
    zero, so the block starts as the identity)."""

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int = 32) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(norm_num_groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        for p in self.proj_out.parameters():
            p.detach().zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape  # (B, C, H, W)
        flat = x.reshape(batch, channels, height * width)  # (B, C, T)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, T)
        dim_head = channels // self.num_heads
        q, k, v = qkv.reshape(batch, self.num_heads, 3 * dim_head, -1).transpose(2, 3).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        out = out.transpose(2, 3).reshape(batch, channels, height * width)  # (B, C, T)
        return (flat + self.proj_out(out)).reshape(batch, channels, height, width)
