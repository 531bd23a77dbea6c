"""Folding eval-mode BatchNorm into the convolution before it (one op and one pass over memory fewer).

A pair is folded only where the convolution's output provably goes nowhere but into the BatchNorm:
- consecutive children ``conv, bn`` of a plain ``nn.Sequential`` (``ConvNormAct``, downsample branches);
- attributes ``self.<conv>`` / ``self.<bn>`` of a module whose methods call them exactly once, as
  ``self.<bn>(self.<conv>(...))`` or ``t = self.<conv>(...)`` directly followed by ``t = self.<bn>(t)``,
  and never mention them otherwise (read from the source with ``ast``; unreadable source: no folding).
The folded model's state dict differs (BatchNorm keys gone, convolutions gain a bias): fold after loading.
Pass ``example`` to check the outputs: if they move by more than ``rtol`` the model is restored unchanged.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, _BatchNorm) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels and isinstance(conv.weight, nn.Parameter))


def _self_attr(node: ast.AST) -> str | None:
    """``X`` for ``self.X``, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _self_call(node: ast.AST) -> tuple[str, ast.Call] | None:
    if isinstance(node, ast.Call):
        name = _self_attr(node.func)
        if name is not None:
            return name, node
    return None


@functools.lru_cache(maxsize=None)
def _attribute_pairs(cls: type) -> tuple[tuple[str, str], ...]:
    """(conv, bn) attribute names that ``cls``'s methods only ever use as ``bn(conv(...))``."""
    trees = []
    for _, fn in inspect.getmembers(cls, inspect.isfunction):
        if fn.__module__.startswith("torch."):
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(fn))))
        except (OSError, TypeError, SyntaxError):
            return ()  # a method we cannot read might use the layers in another way
    calls: dict[str, int] = {}
    mentions: dict[str, int] = {}
    candidates: set[tuple[str, str]] = set()
    for tree in trees:
        for node in ast.walk(tree):
            name = _self_attr(node)
            if name is not None and isinstance(node.ctx, ast.Load):  # creating the layer is no use of it
                mentions[name] = mentions.get(name, 0) + 1
            called = _self_call(node)
            if called is not None:
                outer, call = called
                calls[outer] = calls.get(outer, 0) + 1
                # self.bn(self.conv(...))
                if len(call.args) == 1 and not call.keywords:
                    inner = _self_call(call.args[0])
                    if inner is not None:
                        candidates.add((inner[0], outer))
            # t = self.conv(...); t = self.bn(t)  (consecutive statements of any block)
            for field in ("body", "orelse", "finalbody"):
                stmts = getattr(node, field, None)
                if isinstance(stmts, list):
                    for first, second in zip(stmts, stmts[1:]):
                        pair = _assign_pair(first, second)
                        if pair is not None:
                            candidates.add(pair)
    return tuple(sorted((c, b) for c, b in candidates
                        if calls.get(c) == 1 and calls.get(b) == 1 and mentions.get(c) == 1 and mentions.get(b) == 1))


def _assign_pair(first: ast.stmt, second: ast.stmt) -> tuple[str, str] | None:
    if not (isinstance(first, ast.Assign) and isinstance(second, ast.Assign)):
        return None
    if len(first.targets) != 1 or len(second.targets) != 1:
        return None
    t1, t2 = first.targets[0], second.targets[0]
    if not (isinstance(t1, ast.Name) and isinstance(t2, ast.Name) and t1.id == t2.id):
        return None
    conv, bn = _self_call(first.value), _self_call(second.value)
    if conv is None or bn is None:
        return None
    args = bn[1].args
    if len(args) != 1 or bn[1].keywords or not (isinstance(args[0], ast.Name) and args[0].id == t1.id):
        return None
    return conv[0], bn[0]


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every foldable (parent module, conv child name, bn child name) in ``model``."""
    pairs = []
    for parent in model.modules():
        children = parent._modules
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            names = list(children)
            for a, b in zip(names, names[1:]):
                if _foldable(children[a], children[b]):
                    pairs.append((parent, a, b))
        elif type(parent).__module__.split(".")[0] != "torch":
            for a, b in _attribute_pairs(type(parent)):
                if a in children and b in children and _foldable(children[a], children[b]):
                    pairs.append((parent, a, b))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: _BatchNorm) -> None:
    # y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = conv.weight
    # the per-channel factors in float64, the (large) weight tensor scaled in its own dtype: one rounding
    conv.weight = nn.Parameter(w * scale.to(w.dtype).view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None, rtol: float = 1e-4,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it, in place; returns ``model``.

    With ``example`` (an input batch), the outputs before and after are compared; if their relative error
    exceeds ``rtol`` every change is undone and a warning says so. ``forward`` defaults to ``model``.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first)")
    run = forward or model
    reference = run(example).float() if example is not None else None
    undo = []
    for parent, conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = parent._modules[conv_name], parent._modules[bn_name]
        undo.append((parent, conv, conv.weight, conv.bias, bn_name, bn))
        _fold(conv, bn)
        parent._modules[bn_name] = nn.Identity()
    if reference is not None and undo:
        err = _relative_error(run(example).float(), reference)
        if not err <= rtol:
            for parent, conv, weight, bias, bn_name, bn in reversed(undo):
                conv.weight, conv.bias = weight, bias
                parent._modules[bn_name] = bn
            warnings.warn(f"fold_batchnorm: outputs moved by {err:.2e} (> {rtol:.0e}); model left unfolded",
                          stacklevel=2)
    return model
