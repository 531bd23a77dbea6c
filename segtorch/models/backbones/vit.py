"""Plain Vision Transformer (ViT-Large/16 in the MCIBI configs) returning feature maps of chosen blocks.

Parameter names follow the toolbox's ViT (``patch_embed.projection``, ``cls_token``, ``pos_embed``,
``layers.N.{ln1,attn.attn,ln2,ffn.layers}``), so published state dicts load unchanged. ``forward`` returns
one ``B x C x H/16 x W/16`` map per index in ``out_indices``.

The position embeddings are learnt for ``img_size``; for any other number of patches the grid part is
resized bilinearly (align_corners=False) and the class-token entry is kept. The toolbox decides by the
number of tokens, not the grid shape, and so does this module.

``PatchEmbed``, ``FFN`` and ``DropPath`` are shared with the Swin backbone.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, NormLayer, exporting_to_onnx


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def linear_drop_path_rates(max_rate: float, count: int) -> list[float]:
    """Stochastic depth growing linearly from 0 to ``max_rate`` over ``count`` blocks (plain python, so the
    model can be built on the meta device)."""
    if count <= 1:
        return [0.0] * count
    return [max_rate * i / (count - 1) for i in range(count)]


class DropPath(nn.Module):
    """Drops whole residual branches per sample while training; identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x / keep * mask


class PatchEmbed(nn.Module):
    """Pads the image at the bottom/right ('corner') or evenly ('same') to a multiple of the patch size,
    projects non-overlapping patches with a conv, and returns ``(B, L, C)`` tokens and the grid size."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int, bias: bool = True,
                 norm_layer: NormLayer | None = None, padding: str = "corner"):
        super().__init__()
        if padding not in ("corner", "same"):
            raise ValueError(f"padding must be 'corner' or 'same', got {padding!r}")
        self.patch_size = _pair(patch_size)
        self.padding = padding
        self.projection = nn.Conv2d(in_channels, embed_dims, self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dims) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        pad_h = -h % self.patch_size[0]
        pad_w = -w % self.patch_size[1]
        if pad_h or pad_w or exporting_to_onnx():  # an exported graph pads by what each size needs
            if self.padding == "corner":
                x = F.pad(x, (0, pad_w, 0, pad_h))
            else:
                x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        # NCHW-contiguous: the conv then sums in the same order whatever the input's memory format
        x = self.projection(x.contiguous())
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, grid


class FFN(nn.Module):
    """``num_fcs`` linear layers with the activation between them; the residual lives in the block.

    Keys: ``layers.0.0`` (first linear), ..., ``layers.{num_fcs-1}`` (last linear), as in the toolbox.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, num_fcs: int = 2, act_layer: ActLayer = nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        if num_fcs < 2:
            raise ValueError(f"num_fcs must be at least 2, got {num_fcs}")
        layers: list[nn.Module] = []
        channels = embed_dims
        for _ in range(num_fcs - 1):
            layers.append(nn.Sequential(nn.Linear(channels, hidden_dims), act_layer(), nn.Dropout(drop)))
            channels = hidden_dims
        layers += [nn.Linear(hidden_dims, embed_dims), nn.Dropout(drop)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention; the inner ``attn`` keeps torch's ``in_proj_*``/``out_proj`` names.

    By default it calls ``nn.MultiheadAttention`` exactly as the toolbox does (sequence-first, attention
    weights requested), which takes torch's explicit softmax(QK^T)V path and reproduces the toolbox's
    outputs bit for bit. ``fused=True`` asks for the fused kernel (flash / memory-efficient attention on
    GPU) instead: faster and lighter, equal up to float rounding.
    """

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, bias=qkv_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)  # (L, B, C): the module is sequence-first
        # asking for (unaveraged) weights selects torch's explicit path, the one the toolbox's call takes
        out = self.attn(x, x, x, need_weights=not self.fused, average_attn_weights=False)[0]
        return self.proj_drop(out.transpose(0, 1))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm block. As in the toolbox, stochastic depth applies to the MLP branch only."""

    def __init__(self, embed_dims: int, num_heads: int, hidden_dims: int, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 num_fcs: int = 2, norm_layer: NormLayer = nn.LayerNorm, act_layer: ActLayer = nn.GELU,
                 fused_attention: bool = False):
        super().__init__()
        self.ln1 = norm_layer(embed_dims)
        self.attn = SelfAttention(embed_dims, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                  proj_drop=drop_rate, fused=fused_attention)
        self.ln2 = norm_layer(embed_dims)
        self.ffn = FFN(embed_dims, hidden_dims, num_fcs=num_fcs, act_layer=act_layer, drop=drop_rate)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop_path(self.ffn(self.ln2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_channels: int = 3,
                 embed_dims: int = 768, num_layers: int = 12, num_heads: int = 12, mlp_ratio: float = 4,
                 out_indices: int | Sequence[int] = (9, 14, 19, 23), qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, with_cls_token: bool = True,
                 output_cls_token: bool = False, patch_norm: bool = False, patch_bias: bool = True,
                 patch_pad: str = "corner", pre_norm: bool = False, final_norm: bool = False,
                 out_origin: bool = False, interpolate_mode: str = "bilinear", num_fcs: int = 2,
                 fused_attention: bool = False, norm_layer: NormLayer = nn.LayerNorm,
                 act_layer: ActLayer = nn.GELU):
        super().__init__()
        if output_cls_token and not with_cls_token:
            raise ValueError("output_cls_token requires with_cls_token")
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.with_cls_token = with_cls_token
        self.output_cls_token = output_cls_token
        self.pre_norm = pre_norm
        self.final_norm = final_norm
        self.out_origin = out_origin
        self.interpolate_mode = interpolate_mode
        if isinstance(out_indices, int):
            out_indices = [num_layers - 1 if out_indices == -1 else out_indices]
        self.out_indices = tuple(out_indices)
        # channels of each output feature map (the patch grid before the first layer with out_origin)
        self.out_channels = (embed_dims,) * (len(self.out_indices) + int(out_origin))
        # the learnt position grid (pretraining/training size in patches)
        self.pos_grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, bias=patch_bias,
                                      norm_layer=norm_layer if patch_norm else None, padding=patch_pad)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1] + 1, embed_dims))
        self.drop_after_pos = nn.Dropout(drop_rate)
        if pre_norm:
            self.ln_pre = norm_layer(embed_dims)
        rates = linear_drop_path_rates(drop_path_rate, num_layers)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(embed_dims, num_heads, int(mlp_ratio * embed_dims), qkv_bias=qkv_bias,
                                    drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=rates[i],
                                    num_fcs=num_fcs, norm_layer=norm_layer, act_layer=act_layer,
                                    fused_attention=fused_attention)
            for i in range(num_layers))
        if final_norm:
            self.ln1 = norm_layer(embed_dims)

    def resized_pos_embed(self, grid: tuple[int, int], num_tokens: int) -> torch.Tensor:
        """Position embeddings for ``num_tokens`` tokens (class token + ``grid``)."""
        pos_embed = self.pos_embed
        # an exported graph always resizes (the identity at the learnt size): the test would freeze the traced size
        if not exporting_to_onnx() and num_tokens == pos_embed.shape[1]:
            return pos_embed
        gh, gw = self.pos_grid
        cls_pos = pos_embed[:, :1]
        grid_pos = pos_embed[:, -gh * gw:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=grid, mode=self.interpolate_mode, align_corners=False)
        return torch.cat((cls_pos, grid_pos.flatten(2).transpose(1, 2)), dim=1)

    def _to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens = x[:, 1:] if self.with_cls_token else x
        fmap = tokens.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        return (fmap, x[:, 0]) if self.output_cls_token else fmap

    def forward(self, x: torch.Tensor) -> tuple:
        x, grid = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.drop_after_pos(x + self.resized_pos_embed(grid, x.shape[1]))
        # the class token is always used for the position lookup, and dropped here when not wanted
        if not self.with_cls_token:
            x = x[:, 1:]
        if self.pre_norm:
            x = self.ln_pre(x)
        outs = [self._to_map(x, grid)] if self.out_origin else []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == last and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self._to_map(x, grid))
        return tuple(outs)
