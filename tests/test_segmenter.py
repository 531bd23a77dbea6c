"""The Segmenter's API: logits on arrays and images, confidence, checkpoints stored in half precision."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from parity import seeded_state_dict
from segtorch.inference import preprocess
from segtorch.inference import precision as precision_mod


@functools.lru_cache(maxsize=1)
def _demo():
    import segtorch

    return segtorch.load("demo_pspnet_shapes")


def test_logits_takes_arrays_images_and_warns_on_raw_pixels():
    seg = _demo()
    image = np.random.default_rng(3).integers(0, 255, (45, 61, 3), dtype=np.uint8)
    x = preprocess(image, seg.card.preprocess.resize, seg.card.preprocess.mean, seg.card.preprocess.std)
    from_tensor = seg.logits(x)
    assert torch.equal(seg.logits(x.numpy()), from_tensor)  # a float array is a normalised batch too
    assert torch.equal(seg.logits(x[0].numpy()), from_tensor)  # and 3 x H x W gets its batch dimension
    # an image goes through the card's pipeline: scores at its size, argmax = predict
    scores = seg.logits(image)
    assert scores.shape[2:] == image.shape[:2]
    assert (scores[0].argmax(0).numpy() == seg.predict(image)).all()
    assert seg.logits(x, output_size=(45, 61)).shape[2:] == (45, 61)
    with pytest.warns(UserWarning, match="normalised"):
        seg.logits(torch.from_numpy(image).permute(2, 0, 1)[None].float())


def test_predict_return_scores_is_the_max_probability():
    seg = _demo()
    image = np.random.default_rng(4).integers(0, 255, (33, 47, 3), dtype=np.uint8)
    labels, confidence = seg.predict(image, return_scores=True)
    assert (labels == seg.predict(image)).all() and confidence.dtype == np.float32
    probs = seg.logits(image).softmax(1)[0]
    assert np.allclose(confidence, probs.max(0).values.numpy(), atol=1e-5)
    assert (probs.argmax(0).numpy() == labels).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_runs_in_float32(tmp_path, dtype):
    import segtorch

    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in seeded_state_dict(segtorch.create_model("demo_pspnet_shapes").state_dict()).items()}
    path = tmp_path / "half.pth"
    torch.save({"model": state}, path)
    seg = segtorch.load("demo_pspnet_shapes", checkpoint=path)
    assert seg.precision == "fp32"
    assert {p.dtype for p in seg.model.parameters()} == {torch.float32}
    assert seg.logits(torch.zeros(1, 3, 32, 32)).dtype == torch.float32


def test_reduced_precision_copy_gives_autocasts_outputs(monkeypatch):
    """The bf16 forward stores its convolution weights in bf16 once instead of autocast casting them on every
    call: the same values, so the same outputs; seg.model itself stays float32. (Emulated where the CPU has no
    bf16 instructions; the fp16 path on CUDA is the same code with another dtype.)"""
    from segtorch import Segmenter

    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    seg = _demo()
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    fast = Segmenter(seg.model, seg.card, precision="bf16", fuse_bn=False, channels_last=False)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = seg.model(x)
        with fast._autocast():
            got = fast._forward(x)
    assert torch.equal(got, expected)
    assert {p.dtype for p in seg.model.parameters()} == {torch.float32}
    assert Segmenter(seg.model, seg.card, precision="bf16").channels_last  # a ResNet: channels-last at bf16
    image = np.random.default_rng(5).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    agree = (Segmenter(seg.model, seg.card, precision="bf16").predict(image) == seg.predict(image)).mean()
    assert agree > 0.95
