"""Swin Transformer (Swin-Large, window 12, ImageNet-22k 384 in the IDRNet configs).

Parameter names follow the toolbox's Swin (``patch_embed``, ``stages.N.blocks.M.{norm1,attn.w_msa,norm2,ffn}``,
``stages.N.downsample.{norm,reduction}``, ``normN``), so published state dicts load unchanged, except for
``stages.N.blocks.M.attn.w_msa.relative_position_index``: the toolbox saves that index table, here it is a
non-persistent buffer rebuilt from the window size by ``reset_buffers()`` (drop the key on conversion).

``forward`` returns one normalised ``B x C_i x H_i x W_i`` map per index in ``out_indices`` (strides 4, 8, 16,
32). Feature maps whose size is not a multiple of the window are zero-padded at the bottom/right before the
windows are cut; as in the toolbox the padded tokens take part in the attention of unshifted windows.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, NormLayer
from .vit import FFN, DropPath, PatchEmbed, linear_drop_path_rates

# value added to the attention logits between tokens that the cyclic shift brought together
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``(N, N)`` index into the ``(2Wh-1)(2Ww-1)`` bias table for every pair of tokens of a window."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, window * window, C)``, windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: ``(B * nW, window * window, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """``(nW, N, N)`` additive mask for the shifted windows of a padded ``h x w`` map.

    After the cyclic shift the rows fall into three bands, [0, h-window), [h-window, h-shift) and
    [h-shift, h), and so do the columns; the 3 x 3 regions they make were not neighbours before the shift, so
    tokens of different regions must not attend to each other inside one window.
    """
    def regions(length: int) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        return (pos >= length - window).long() + (pos >= length - shift).long()

    ids = regions(h)[:, None] * 3 + regions(w)[None, :]
    ids = window_partition(ids[None, :, :, None], window).squeeze(-1)  # (nW, N)
    different = ids[:, None, :] != ids[:, :, None]
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(different, zero + SHIFT_MASK_VALUE, zero)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside windows, with a learnt relative position bias per head.

    The default path computes softmax(q k^T * scale + bias + mask) v in the toolbox's order of operations,
    which reproduces its outputs bit for bit; ``fused=True`` uses ``scaled_dot_product_attention``
    (equal up to float rounding, faster on GPU).
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = (window_size, window_size)
        self.scale = qk_scale or (embed_dims // num_heads) ** -0.5
        self.fused = fused
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) * (2 * window_size - 1), num_heads))
        self.register_buffer("relative_position_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_buffers()
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_buffers(self) -> None:
        # on the device of the bias table (meta while the model is built on meta, real once weights are loaded)
        device = self.relative_position_bias_table.device
        self.relative_position_index = relative_position_index(self.window_size, device)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()  # (heads, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B * nW, N, C)`` windows; ``mask``: ``(nW, N, N)`` additive mask or None."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias().unsqueeze(0)  # (1, heads, N, N)
        if self.fused:
            if mask is not None:
                # windows are ordered image by image, so the per-window masks repeat for every image
                bias = (bias + mask.unsqueeze(1)).repeat(b // mask.shape[0], 1, 1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn + bias
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(b // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, n, n)
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class ShiftWindowMSA(nn.Module):
    """Pads the map to a multiple of the window, (cyclically shifts it,) attends inside windows, undoes both."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused: bool = False):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSA(embed_dims, num_heads, window_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=proj_drop, fused=fused)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """``x``: ``(B, H*W, C)``; ``mask``: the stage's shifted-window mask (used only if this block shifts)."""
        b, _, c = x.shape
        h, w = hw_shape
        ws, shift = self.window_size, self.shift_size
        x = x.view(b, h, w, c)
        x = F.pad(x, (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = x.shape[1], x.shape[2]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        out = self.w_msa(window_partition(x, ws), mask=mask if shift else None)
        x = window_reverse(out, ws, hp, wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :h, :w, :].reshape(b, h * w, c)


class SwinBlock(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, hidden_dims: int, window_size: int, shift: bool,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_layer: NormLayer = nn.LayerNorm,
                 act_layer: ActLayer = nn.GELU, fused_attention: bool = False):
        super().__init__()
        self.norm1 = norm_layer(embed_dims)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size, shift_size=window_size // 2 if shift else 0,
                                   qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop_rate,
                                   proj_drop=drop_rate, fused=fused_attention)
        self.norm2 = norm_layer(embed_dims)
        self.ffn = FFN(embed_dims, hidden_dims, num_fcs=2, act_layer=act_layer, drop=drop_rate)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape, mask))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods (zero-padded at the bottom/right) -> concatenated channels -> norm -> linear.

    The channels are concatenated in ``nn.Unfold`` order (channel-major, then the 2x2 position), which is the
    order the toolbox's weights expect.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer | None = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(4 * in_channels) if norm_layer is not None else None
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        b, _, c = x.shape
        h, w = hw_shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        oh, ow = x.shape[1] // 2, x.shape[2] // 2
        x = x.view(b, oh, 2, ow, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, oh * ow, 4 * c)
        if self.norm is not None:
            x = self.norm(x)
        return self.reduction(x), (oh, ow)


class SwinBlockSequence(nn.Module):
    """One stage: blocks alternating plain and shifted windows, then (except the last stage) patch merging."""

    def __init__(self, embed_dims: int, num_heads: int, hidden_dims: int, depth: int, window_size: int,
                 drop_path_rates: Sequence[float], downsample: nn.Module | None = None, **block_kwargs):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dims, num_heads, hidden_dims, window_size, shift=i % 2 == 1,
                      drop_path_rate=drop_path_rates[i], **block_kwargs)
            for i in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]):
        """Returns (input of the next stage, its size, this stage's output, its size)."""
        mask = None
        if len(self.blocks) > 1:
            # every shifted block of the stage sees the same padded size: build the mask once
            ws = self.window_size
            hp, wp = hw_shape[0] + (-hw_shape[0] % ws), hw_shape[1] + (-hw_shape[1] % ws)
            mask = shifted_window_mask(hp, wp, ws, ws // 2, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, hw_shape, mask)
        if self.downsample is None:
            return x, hw_shape, x, hw_shape
        down, down_shape = self.downsample(x, hw_shape)
        return down, down_shape, x, hw_shape


class SwinTransformer(nn.Module):
    def __init__(self, pretrain_img_size: int | Sequence[int] = 224, in_channels: int = 3, embed_dims: int = 96,
                 patch_size: int = 4, window_size: int = 7, mlp_ratio: float = 4,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 strides: Sequence[int] = (4, 2, 2, 2), out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True, qk_scale: float | None = None, patch_norm: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 use_abs_pos_embed: bool = False, fused_attention: bool = False,
                 norm_layer: NormLayer = nn.LayerNorm, act_layer: ActLayer = nn.GELU):
        super().__init__()
        if strides[0] != patch_size or any(s != 2 for s in strides[1:]):
            raise ValueError(f"only non-overlapping patches and 2x2 merging are supported, got strides {strides}")
        if isinstance(pretrain_img_size, int):
            pretrain_img_size = (pretrain_img_size, pretrain_img_size)
        self.out_indices = tuple(out_indices)
        self.use_abs_pos_embed = use_abs_pos_embed
        num_stages = len(depths)
        self.num_features = [embed_dims * 2 ** i for i in range(num_stages)]
        self.out_channels = tuple(self.num_features[i] for i in self.out_indices)

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size,
                                      norm_layer=norm_layer if patch_norm else None)
        if use_abs_pos_embed:
            num_patches = (pretrain_img_size[0] // patch_size) * (pretrain_img_size[1] // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dims))
        self.drop_after_pos = nn.Dropout(drop_rate)
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            channels = self.num_features[i]
            downsample = None
            if i < num_stages - 1:
                downsample = PatchMerging(channels, 2 * channels, norm_layer=norm_layer if patch_norm else None)
            first = sum(depths[:i])
            self.stages.append(SwinBlockSequence(
                channels, num_heads[i], int(mlp_ratio * channels), depth, window_size,
                drop_path_rates=rates[first:first + depth], downsample=downsample, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, norm_layer=norm_layer,
                act_layer=act_layer, fused_attention=fused_attention))
        for i in self.out_indices:
            self.add_module(f"norm{i}", norm_layer(self.num_features[i]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, hw_shape = self.patch_embed(x)
        if self.use_abs_pos_embed:
            # learnt for the pretraining size only, as in the toolbox (other sizes do not broadcast)
            x = x + self.absolute_pos_embed
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw_shape, out, out_shape = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, *out_shape, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)
