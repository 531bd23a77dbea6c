"""What a card's ``training`` section means: parameter groups, optimizer, poly schedule, losses.

All three follow the toolbox (SSSegmentation): ``params_rules`` map a substring of a parameter's full name
to lr/weight-decay multipliers (the longest matching rule wins; e.g. Swin's ``norm`` and position tables
get no weight decay); the learning rate follows ``(1 - iter/max_iters) ** power`` from ``lr`` to ``min_lr``
(default ``lr / 100``) with optional warmup, updated before every optimizer step; gradients are clipped
per parameter group of the toolbox (``clipgrad_cfg``). The losses are in ``losses.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.nn as nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_NOT_OPTIMIZER_ARGS = ("type", "params_rules", "base_setting", "filter_params")


def param_groups(model: nn.Module, optimizer_cfg: Mapping) -> list[dict]:
    """Parameter groups for ``optimizer_cfg`` (``lr``, ``weight_decay``, ``params_rules``, ``base_setting``).

    Each group carries ``lr_multiplier``: the schedule sets ``lr = lr_multiplier * scheduled_lr``.
    Parameters with the same multipliers share a group (the toolbox makes one group per parameter; the
    update is the same).
    """
    rules = dict(optimizer_cfg.get("params_rules") or {})
    kind = rules.pop("type", "DefaultParamsConstructor")
    if kind != "DefaultParamsConstructor":
        raise NotImplementedError(f"params_rules type {kind!r} (layer-wise lr decay) is not supported by the trainer")
    lr, wd = optimizer_cfg["lr"], optimizer_cfg.get("weight_decay")
    if not rules:
        group = {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "lr_multiplier": 1.0}
        return [group]
    base = optimizer_cfg.get("base_setting", {})
    keys = sorted(sorted(rules), key=len, reverse=True)  # longest first, ties alphabetical (as the toolbox)
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}"  # top-level parameters read ".name", as in the toolbox
            rule = next((k for k in keys if k in full), None)
            if rule is not None:
                lr_mult, wd_mult = rules[rule].get("lr_multiplier", 1.0), rules[rule].get("wd_multiplier", 1.0)
            else:
                is_bias = name == "bias" and not is_norm
                lr_mult = base.get("bias_lr_multiplier" if is_bias else "lr_multiplier", 1.0)
                wd_mult = base.get("norm_wd_multiplier" if is_norm else "bias_wd_multiplier" if name == "bias"
                                   else "wd_multiplier", 1.0)
            key = (float(lr_mult), float(wd_mult))
            if key not in groups:
                groups[key] = {"params": [], "lr": lr * lr_mult, "lr_multiplier": lr_mult}
                if wd is not None:
                    groups[key]["weight_decay"] = wd * wd_mult
            groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, optimizer_cfg: Mapping) -> torch.optim.Optimizer:
    """``{"type": "SGD", "lr": .., "momentum": .., "weight_decay": .., "params_rules": {..}}`` -> optimizer."""
    kind = optimizer_cfg["type"]
    cls = getattr(torch.optim, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"unknown optimizer {kind!r} (a torch.optim class name such as SGD or AdamW)")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in optimizer_cfg.items()
              if k not in _NOT_OPTIMIZER_ARGS}
    return cls(param_groups(model, optimizer_cfg), **kwargs)


@dataclasses.dataclass
class PolySchedule:
    """The toolbox's PolyScheduler, iteration-based; state is the iteration alone."""
    lr: float
    max_iters: int
    power: float = 0.9
    min_lr: float | None = None
    warmup_cfg: Mapping | None = None

    @classmethod
    def from_config(cls, cfg: Mapping, lr: float, max_iters: int) -> "PolySchedule":
        kind = cfg.get("type", "PolyScheduler")
        if kind != "PolyScheduler":
            raise NotImplementedError(f"scheduler {kind!r} is not supported by the trainer (PolyScheduler is)")
        return cls(lr=lr, max_iters=max_iters, power=cfg.get("power", 0.9), min_lr=cfg.get("min_lr"),
                   warmup_cfg=cfg.get("warmup_cfg"))

    def lr_at(self, iteration: int) -> float:
        min_lr = self.min_lr if self.min_lr is not None else self.lr * 0.01
        lr = (1 - iteration / self.max_iters) ** self.power * (self.lr - min_lr) + min_lr
        w = self.warmup_cfg
        if not w or iteration > w["iters"]:
            return lr
        progress = iteration / w["iters"]
        if w["type"] == "constant":
            return lr * w["ratio"]
        if w["type"] == "linear":
            return (1 - (1 - progress) * (1 - w["ratio"])) * lr
        if w["type"] == "exp":
            return w["ratio"] ** (1 - progress) * lr
        raise ValueError(f"unknown warmup type {w['type']!r} (constant, linear or exp)")

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        lr = self.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = group.get("lr_multiplier", 1.0) * lr
        return lr


def clip_gradients(model: nn.Module, optimizer_cfg: Mapping, clip_cfg: Mapping) -> None:
    """The toolbox clips each of its parameter groups on its own: all parameters together without
    ``params_rules``, each parameter alone with them (it makes one group per parameter)."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not optimizer_cfg.get("params_rules"):
        if params:
            nn.utils.clip_grad_norm_(params, **clip_cfg)
        return
    for p in params:
        nn.utils.clip_grad_norm_([p], **clip_cfg)
