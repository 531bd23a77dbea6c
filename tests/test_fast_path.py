"""The fast path's rewrites: BatchNorm folding and the split pyramid bottleneck compute the same function."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import segtorch
from parity import relative_error, seeded_state_dict
from segtorch.inference import fold_batchnorm
from segtorch.inference.fuse import conv_bn_pairs


class _Block(nn.Module):
    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # conv3's output is used twice: not declared

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv3's output is used twice

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = self.bn2(out)
        y = self.conv3(out)
        return self.bn3(y) + y


def _randomize(model: nn.Module) -> nn.Module:
    state = seeded_state_dict(model.state_dict())
    model.load_state_dict(state)
    return model.eval()


def test_fold_batchnorm():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Block()))
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        before = model(x)
    names = sorted((type(p).__name__, a, b) for p, a, b in conv_bn_pairs(model))
    assert names == [("Sequential", "0", "1"), ("_Block", "conv1", "bn1"), ("_Block", "conv2", "bn2")]
    assert fold_batchnorm(model, example=x) is model
    with torch.no_grad():
        after = model(x)
    assert relative_error(after, before) < 1e-5
    assert isinstance(model[1], nn.Identity) and isinstance(model[3].bn3, nn.BatchNorm2d)


def test_fold_batchnorm_restores_when_outputs_move():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match="unfolded"):
        fold_batchnorm(model, example=x, rtol=0.0)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model.train())

def test_fold_batchnorm_leaves_the_loaded_tensors_alone_and_writes_the_asked_layout(tmp_path):
    """Weights read from a file may be a private memory map (writing pays a page fault per 4 KiB) or shared
    with the caller's state dict: folding writes fresh tensors, in the layout the model will run in."""
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Block()))
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        before = model(x)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    fold_batchnorm(model, memory_format=torch.channels_last)
    for name, weight in originals.items():
        key = f"{name}.weight"
        assert torch.equal(weight, loaded[key]), f"{key} was written in place"
    for conv in (model[0], model[3].conv1):  # folded 3x3 kernels: NHWC, a layout NCHW is not
        assert conv.weight is not originals["0" if conv is model[0] else "3.conv1"]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert model[3].conv3.weight is originals["3.conv3"]  # not folded: untouched
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5



@pytest.mark.parametrize("align_corners", [False, True])
def test_split_pyramid_bottleneck_is_the_same_function(align_corners):
    """The split bottleneck (the pooled branches' share computed at their own scale, upsampled and shifted by
    matrices) computes the concatenated 3x3 convolution: equal in float64 at sizes the pooled maps are
    smaller and larger than, in both layouts. (Exported graphs: tests/test_export.py.)"""
    from segtorch.models.decoders import pyramid_pooling as psp

    torch.manual_seed(0)
    ppm = psp.PyramidPoolingModule(16, 8, (1, 2, 3, 6), align_corners=align_corners).eval()
    for m in ppm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    fold_batchnorm(ppm)
    reference = copy.deepcopy(ppm).double()
    split = copy.deepcopy(ppm)
    psp.split_pyramid_bottlenecks(split)
    assert isinstance(split.bottleneck[0], psp.SplitBottleneckConv)
    assert torch.equal(split.bottleneck[0].merged_weight(), ppm.bottleneck[0].weight)
    split64 = copy.deepcopy(split).double()
    with torch.no_grad():
        for shape in [(2, 16, 13, 9), (1, 16, 4, 5), (1, 16, 1, 1), (1, 16, 32, 7)]:
            x = torch.randn(shape, dtype=torch.float64)
            expected = reference(x)
            for layout in (torch.contiguous_format, torch.channels_last):
                got = split64.to(memory_format=layout)(x.contiguous(memory_format=layout))
                assert (got - expected).abs().max().item() < 1e-12, (shape, layout)
    # the interpolation matrices are cached; made first under inference_mode, autograd can still use them
    psp._cached_tap_interpolation.cache_clear()
    x = torch.randn(1, 16, 11, 9, dtype=torch.float64)
    with torch.inference_mode():
        first = split64(x)
    x.requires_grad_(True)
    again = split64(x)
    again.sum().backward()
    assert torch.equal(again.detach(), first) and x.grad is not None


def test_load_splits_the_pyramid_bottleneck_only_on_the_fast_path(tmp_path):
    from safetensors.torch import save_file

    from segtorch.models.decoders.pyramid_pooling import SplitBottleneckConv

    name = "upernet_resnet50os8_ade20k"
    path = tmp_path / "w.safetensors"
    save_file(seeded_state_dict(segtorch.create_model(name).state_dict()), str(path))
    def split(seg):
        return [isinstance(m, SplitBottleneckConv) for m in seg.inference_module.modules()].count(True)

    assert split(segtorch.load(name, checkpoint=path)) == 1
    assert split(segtorch.load(name, checkpoint=path, fuse_bn=False)) == 0
    assert split(segtorch.load(name, checkpoint=path, exact=True)) == 0


def test_fold_batchnorm_on_resnet_bottleneck():
    from segtorch.models.backbones.resnet import Bottleneck

    pairs = {(a, b) for p, a, b in conv_bn_pairs(_randomize(Bottleneck(8, 2))) if isinstance(p, Bottleneck)}
    assert pairs == {("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")}


