"""The toolbox's generic query/key/value self-attention block (shared by ISNet, MCIBI, IDRNet, ...).

Queries come from one feature map and keys/values from another (possibly the same); each side is projected
by 1x1 convs, the attention runs over all key positions and the result is projected back to ``out_channels``.
Attribute names (``key_project``, ``query_project``, ``value_project``, ``out_project``) and the nesting of the
projection Sequentials follow the toolbox so its checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer


def build_project(in_channels: int, out_channels: int, num_convs: int, use_norm: bool,
                  norm_layer: NormLayer, act_layer: ActLayer) -> nn.Module:
    """``num_convs`` 1x1 convs (each followed by norm+act when ``use_norm``). A single conv is returned bare,
    several are wrapped in an ``nn.Sequential`` -- this decides the key names (``x.0.weight`` vs ``x.0.0.weight``)."""
    if use_norm:
        convs: list[nn.Module] = [ConvNormAct(in_channels if i == 0 else out_channels, out_channels, 1,
                                              norm_layer=norm_layer, act_layer=act_layer) for i in range(num_convs)]
    else:
        convs = [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 1, bias=False)
                 for i in range(num_convs)]
    return convs[0] if len(convs) == 1 else nn.Sequential(*convs)


class SelfAttentionBlock(nn.Module):
    def __init__(self, key_in_channels: int, query_in_channels: int, transform_channels: int, out_channels: int,
                 share_key_query: bool = False, query_downsample: nn.Module | None = None,
                 key_downsample: nn.Module | None = None, key_query_num_convs: int = 2, value_out_num_convs: int = 1,
                 key_query_norm: bool = True, value_out_norm: bool = True, matmul_norm: bool = True,
                 with_out_project: bool = True, norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.key_project = build_project(key_in_channels, transform_channels, key_query_num_convs, key_query_norm,
                                         norm_layer, act_layer)
        if share_key_query:
            if key_in_channels != query_in_channels:
                raise ValueError("share_key_query needs key_in_channels == query_in_channels")
            self.query_project = self.key_project
        else:
            self.query_project = build_project(query_in_channels, transform_channels, key_query_num_convs,
                                               key_query_norm, norm_layer, act_layer)
        self.value_project = build_project(key_in_channels, transform_channels if with_out_project else out_channels,
                                           value_out_num_convs, value_out_norm, norm_layer, act_layer)
        self.out_project = (build_project(transform_channels, out_channels, value_out_num_convs, value_out_norm,
                                          norm_layer, act_layer) if with_out_project else None)
        self.query_downsample = query_downsample
        self.key_downsample = key_downsample
        self.matmul_norm = matmul_norm
        self.transform_channels = transform_channels

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        batch_size = query_feats.shape[0]
        query = self.query_project(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        query = query.flatten(2).transpose(1, 2)                      # (B, Nq, T)
        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        if self.key_downsample is not None:
            key = self.key_downsample(key)
            value = self.key_downsample(value)
        key = key.flatten(2)                                          # (B, T, Nk)
        value = value.flatten(2).transpose(1, 2)                      # (B, Nk, V)
        sim_map = torch.matmul(query, key)
        if self.matmul_norm:
            sim_map = (self.transform_channels ** -0.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value)                        # (B, Nq, V)
        # the output takes the spatial size of the (not downsampled) query input, as in the toolbox
        context = context.transpose(1, 2).reshape(batch_size, -1, *query_feats.shape[2:])
        if self.out_project is not None:
            context = self.out_project(context)
        return context


def context_attention(key_in_channels: int, query_in_channels: int, transform_channels: int, out_channels: int,
                      norm_layer: NormLayer, act_layer: ActLayer) -> SelfAttentionBlock:
    """The configuration ISNet and MCIBI use: two normalised key/query convs, one value conv, scaled dot
    products, an output projection."""
    return SelfAttentionBlock(
        key_in_channels=key_in_channels, query_in_channels=query_in_channels, transform_channels=transform_channels,
        out_channels=out_channels, share_key_query=False, query_downsample=None, key_downsample=None,
        key_query_num_convs=2, value_out_num_convs=1, key_query_norm=True, value_out_norm=True, matmul_norm=True,
        with_out_project=True, norm_layer=norm_layer, act_layer=act_layer)
