"""Class scores and label maps with the toolbox's test-time procedure (``inference`` + ``auginference`` of its
segmentors, averaged as its ``inference.py`` / ``test.py`` average them), computed with less memory and time.

The toolbox, per scale ``s`` (and per flip):
  1. ``x_s = interpolate(x, scale_factor=s, bilinear)`` (the normalised, already resized input);
  2. whole: ``scores = model(x_s)`` at the head's output stride (softmax there if ``softmax_before_resize``);
     slide: every crop's scores resized to the crop (softmax if asked), summed into an ``x_s``-sized map,
     divided by how many crops cover each pixel;
  3. flip: the same on ``flip(x_s)``, the paired classes swapped, the scores flipped back;
and then every scale's (and flip's) scores are resized *directly* to the output size (the original image)
and averaged. Here every crop is added by slice into its pass's buffer (the toolbox pads each crop to full
size), crops are batched, each flipped crop runs in the same batch as its unflipped twin (the flipped pass is
summed in flipped coordinates and flipped back once), buffers keep the model's memory layout (channels-last
scores are not transposed), and a scale's flipped and unflipped scores are summed before the (linear)
resize, so each scale is resized once.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .image import ImageSource, preprocess, read_image

Model = Callable[[torch.Tensor], torch.Tensor]

# Rough peak activation memory of a large segmentor per input pixel at fp32 (ResNet-101 os8, Swin-L, ViT-L
# at 512x512 stay under it); sets how many crops go into one batch when ``batch_crops`` is not given.
_BYTES_PER_PIXEL = 4096
_CPU_PIXEL_BUDGET = 1 << 19  # two 512x512 crops (eight 256x256): batching gains little on the CPU, memory counts
# the temporary of the final resize is made channel-chunk by channel-chunk, at most this many elements
_RESIZE_CHUNK_ELEMENTS = 1 << 25


def _pixel_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // 2 // _BYTES_PER_PIXEL)
    return _CPU_PIXEL_BUDGET


def _pair(value, name: str) -> tuple[int, int]:
    if value is None:
        raise ValueError(f"mode='slide' needs {name}")
    if isinstance(value, (int, float)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def slide_windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
                  ) -> list[tuple[int, int, int, int]]:
    """The toolbox's sliding-window grid as (y1, y2, x1, x2): ``crop_size``/``stride`` are (h, w); the last
    window of a row/column is shifted back to end at the border; windows are clipped to small images."""
    (ch, cw), (sh, sw) = crop_size, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def _swap_index(num_classes: int, flip_pairs: Sequence[Sequence[int]]) -> list[int] | None:
    """Channel order of flipped scores (left/right classes exchanged), applied pair by pair as the toolbox
    does: every assignment reads the unswapped scores, so a later pair overrides an earlier one."""
    if not flip_pairs:
        return None
    index = list(range(num_classes))
    for a, b in flip_pairs:
        index[a], index[b] = b, a
    return index


def _run(model: Model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()  # an autocast forward gives half-precision scores; accumulate in float32


def _unflip(scores: torch.Tensor, swap: list[int] | None) -> torch.Tensor:
    if swap is not None:
        scores = scores[:, swap]
    return scores.flip(3)


Scratch = dict  # (shape, dtype, device, layout) -> a buffer reused by _resize within one infer_logits call


def _layout(x: torch.Tensor) -> torch.memory_format:
    """``x``'s memory layout: channels-last scores written into NCHW buffers (or back) would be a transposing,
    several times slower, copy or add."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _resize(x: torch.Tensor, size, align_corners: bool, scratch: Scratch | None = None) -> torch.Tensor:
    """``F.interpolate(x, size, bilinear)`` in ``x``'s memory layout, written into a buffer reused from call to
    call when ``scratch`` is given: on the CPU, filling fresh pages cost ~8x the resize itself. Such a result
    is valid until the next call with the same shape: use it at once."""
    shape = (*x.shape[:2], int(size[0]), int(size[1]))
    fmt = _layout(x)
    key = (shape, x.dtype, x.device, fmt)
    out = scratch.get(key) if scratch is not None else None
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        if scratch is not None:
            scratch[key] = out
    # F.interpolate(size=...) runs this same kernel, with no scale factors given
    torch.ops.aten.upsample_bilinear2d.out(x, list(shape[2:]), align_corners, None, None, out=out)
    return out


def _add_resized(buffer: torch.Tensor, scores: torch.Tensor, align_corners: bool, scratch: Scratch) -> None:
    """``buffer += resize(scores, buffer's size)``, the full-size temporary made a few channels at a time."""
    size = buffer.shape[2:]
    if scores.shape[2:] == size:  # a bilinear resize to the same size is the identity
        buffer += scores
        return
    per_channel = buffer.shape[0] * size[0] * size[1]
    step = max(1, _RESIZE_CHUNK_ELEMENTS // per_channel)
    for c in range(0, buffer.shape[1], step):
        buffer[:, c:c + step] += _resize(scores[:, c:c + step], size, align_corners, scratch)


def _whole(model: Model, x: torch.Tensor, *, flip: bool, swap: list[int] | None, softmax: bool,
           batch_twin: bool) -> torch.Tensor:
    """One scale, whole image: scores at the head's output stride, the flipped pass already added."""
    n = x.shape[0]
    if flip and batch_twin:
        out = _run(model, torch.cat([x, x.flip(3)]))
        plain, flipped = out[:n], out[n:]
    else:
        plain = _run(model, x)
        flipped = _run(model, x.flip(3)) if flip else None
    if softmax:
        plain = plain.softmax(dim=1)
        flipped = flipped.softmax(dim=1) if flipped is not None else None
    if flipped is not None:
        plain = plain + _unflip(flipped, swap)
    return plain


def _zeros_like_layout(like: torch.Tensor, n: int, height: int, width: int) -> torch.Tensor:
    """Float32 zeros N x C x H x W (C from ``like``) in ``like``'s memory layout."""
    return torch.empty((n, like.shape[1], height, width), dtype=torch.float32, device=like.device,
                       memory_format=_layout(like)).zero_()


def _slide(model: Model, x: torch.Tensor, *, crop_size: tuple[int, int], stride: tuple[int, int], flip: bool,
           swap: list[int] | None, softmax: bool, align_corners: bool, per_batch: int, scratch: Scratch
           ) -> torch.Tensor:
    """One scale, sliding window: the crop-averaged scores N x C x H x W (the size of ``x``), the flipped
    pass's already added. As the toolbox does per pass: the crops' scores summed, divided by how many crops
    cover each pixel; the flipped pass is summed in flipped coordinates and flipped back once at the end."""
    n, _, height, width = x.shape
    boxes = slide_windows(height, width, crop_size, stride)
    count = x.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in boxes:
        count[:, :, y1:y2, x1:x2] += 1
    # the crop of flip(x) at box (x1, x2) is the flipped crop of x at (W - x2, W - x1): both passes use the same
    # grid, so each box's flipped twin has its shape and shares its batch
    work = [(box, mirrored) for box in boxes for mirrored in ((False, True) if flip else (False,))]
    sums: dict[bool, torch.Tensor] = {}  # mirrored -> that pass's sum of crop scores (in its own coordinates)
    items_per_batch = max(1, per_batch // n)
    for start in range(0, len(work), items_per_batch):
        chunk = work[start:start + items_per_batch]
        crops = []
        for (y1, y2, x1, x2), mirrored in chunk:
            crops.append(x[:, :, y1:y2, width - x2:width - x1].flip(3) if mirrored else x[:, :, y1:y2, x1:x2])
        out = _run(model, torch.cat(crops) if len(crops) > 1 else crops[0])
        crop_hw = crops[0].shape[2:]
        for k, ((y1, y2, x1, x2), mirrored) in enumerate(chunk):
            scores = out[k * n:(k + 1) * n]
            if scores.shape[2:] != crop_hw:  # crop by crop, into one reused buffer
                scores = _resize(scores, crop_hw, align_corners, scratch)
            if softmax:
                scores = scores.softmax(dim=1)
            if mirrored not in sums:
                sums[mirrored] = _zeros_like_layout(scores, n, height, width)
            sums[mirrored][:, :, y1:y2, x1:x2] += scores
    scores = sums[False].div_(count)
    if flip:
        scores += _unflip(sums[True].div_(count), swap)
    return scores


def _model_dtype(model) -> torch.dtype | None:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.dtype
    return None


def _scale_scores(model: Model, images: torch.Tensor, *, num_classes: int, align_corners: bool,
                  mode: str | None = "whole", crop_size: Sequence[int] | int | None = None,
                  stride: Sequence[int] | int | None = None, scales: Sequence[float] | None = (1.0,),
                  flip: bool | None = False, flip_pairs: Sequence[Sequence[int]] | None = (),
                  softmax_before_resize: bool | None = False, batch_crops: int | None = None):
    """Each scale's scores, its flipped pass's added, before the final resize, with whether the buffer is
    ours (the caller may keep it): at the head's stride (whole) or at the scaled input's size (slide). The
    test-time settings and their defaults (``infer_logits`` says what they mean)."""
    mode = mode or "whole"
    scales = tuple(scales) if scales else (1.0,)
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', not {mode!r}")
    flip, softmax = bool(flip), bool(softmax_before_resize)
    swap = _swap_index(num_classes, flip_pairs) if flip else None
    if images.ndim != 4:
        raise ValueError(f"images must be N x 3 x H x W, got shape {tuple(images.shape)}")
    dtype = _model_dtype(model)
    # the toolbox casts inputs to the parameters' dtype; weights stored in bf16/fp16 for autocast (Segmenter's
    # reduced-precision copy) leave the images in float32 for the resizes, as autocast does
    if dtype in (torch.float32, torch.float64) and dtype != images.dtype:
        images = images.to(dtype)
    n = images.shape[0]
    budget = _pixel_budget(images.device)
    if mode == "slide":
        crop_hw, stride_hw = _pair(crop_size, "crop_size"), _pair(stride, "stride")
        per_batch = batch_crops or max(1, budget // (crop_hw[0] * crop_hw[1]))
    scratch: Scratch = {}
    for s in scales:
        # scale 1 is the identity for bilinear interpolation: skip the copy
        x = images if float(s) == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear",
                                                         align_corners=align_corners)
        if mode == "whole":
            # the flipped image joins its twin's batch if batch_crops allows two images each, or if the
            # memory budget does
            twin = 2 * n <= batch_crops if batch_crops else 2 * n * x.shape[2] * x.shape[3] <= budget
            scores, owned = _whole(model, x, flip=flip, swap=swap, softmax=softmax, batch_twin=twin), False
        else:
            scores, owned = _slide(model, x, crop_size=crop_hw, stride=stride_hw, flip=flip, swap=swap,
                                   softmax=softmax, align_corners=align_corners, per_batch=per_batch,
                                   scratch=scratch), True
        if scores.shape[1] != num_classes:
            raise ValueError(f"the model gives {scores.shape[1]} class scores, the card says {num_classes}")
        yield scores, owned


def _output_size(images: torch.Tensor, output_size) -> tuple[int, int]:
    return tuple(images.shape[2:]) if output_size is None else (int(output_size[0]), int(output_size[1]))


@torch.inference_mode()
def infer_logits(model: Model, images: torch.Tensor, *, num_classes: int, align_corners: bool,
                 output_size: Sequence[int] | None = None, **settings) -> torch.Tensor:
    """Scores N x C x H x W for normalised ``images`` N x 3 x h x w, averaged over ``scales`` and (with
    ``flip``) horizontal flips as the toolbox averages them. ``H x W`` is ``output_size`` (default: the input
    size); every scale's scores are resized straight to it, as the toolbox resizes to the original image.

    ``mode``: "whole" or "slide" (``crop_size``/``stride`` as (h, w)). ``flip_pairs``: classes that swap under
    a horizontal flip (e.g. left/right arm). ``softmax_before_resize``: average probabilities (softmax at the
    model's resolution, or per crop) instead of logits. ``batch_crops``: images per forward pass (default:
    from a memory budget). Each setting (``mode``, ``crop_size``, ``stride``, ``scales`` (1.0,), ``flip``
    False, ``flip_pairs``, ``softmax_before_resize`` False, ``batch_crops``) may be left out or None for its
    default.
    """
    size = _output_size(images, output_size)
    scratch: Scratch = {}
    total, terms = None, 0  # total: made from the first scale's scores, in their memory layout
    for scores, owned in _scale_scores(model, images, num_classes=num_classes, align_corners=align_corners,
                                       **settings):
        terms += 2 if settings.get("flip") else 1
        if total is not None:
            _add_resized(total, scores, align_corners, scratch)
        elif tuple(scores.shape[2:]) == size:  # the first term is resized straight into ``total`` (0 + x
            total = scores if owned else scores.clone()  # is x): no zero-filled buffer, no temporary
        else:
            total = _resize(scores, size, align_corners)
    if terms > 1:  # dividing by 1 is the identity: no pass over the full-size scores
        total /= terms
    return total


def _toolbox_pass(model: Model, x: torch.Tensor, *, num_classes: int, align_corners: bool, mode: str,
                  crop_size, stride, softmax: bool) -> torch.Tensor:
    """The toolbox's ``BaseSegmentor.inference`` on one scaled (or flipped) batch, operation for operation."""
    if mode == "whole":
        scores = _run(model, x)
        return scores.softmax(dim=1) if softmax else scores
    n, _, height, width = x.shape
    scores = x.new_zeros((n, num_classes, height, width))
    count = x.new_zeros((n, 1, height, width))
    # its buffer gains each crop padded to full size with zeros, crop after crop: adding a crop into its slice
    # adds the same values in the same order (x + 0 is x)
    for y1, y2, x1, x2 in slide_windows(height, width, _pair(crop_size, "crop_size"), _pair(stride, "stride")):
        crop = x[:, :, y1:y2, x1:x2]
        out = F.interpolate(_run(model, crop), size=crop.shape[2:], mode="bilinear", align_corners=align_corners)
        if softmax:
            out = F.softmax(out, dim=1)
        scores[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    return scores / count


@torch.inference_mode()
def toolbox_logits(model: Model, images: torch.Tensor, *, num_classes: int, align_corners: bool,
                   output_size: Sequence[int] | None = None, mode: str | None = "whole",
                   crop_size: Sequence[int] | int | None = None, stride: Sequence[int] | int | None = None,
                   scales: Sequence[float] | None = (1.0,), flip: bool | None = False,
                   flip_pairs: Sequence[Sequence[int]] | None = (), softmax_before_resize: bool | None = False,
                   batch_crops: int | None = None) -> torch.Tensor:
    """``infer_logits`` computed as the toolbox computes it (``exact`` mode), for the same arguments: per scale
    ``interpolate(scale_factor=s)`` (scale 1 too), the whole image or every crop in its own forward pass
    (``batch_crops`` is not used), the flipped pass as a separate pass whose paired classes are swapped and
    which is flipped back, every scale's and flip's scores resized to the output size on their own, summed in
    the toolbox's order (scale by scale, each flip after its scale), divided by their number. The same float32
    operations in the same order give the toolbox's numbers; the sum is kept as it goes rather than as the
    toolbox's list of full-size maps (the same additions, one map held instead of one per scale and flip)."""
    mode = mode or "whole"
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', not {mode!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be N x 3 x H x W, got shape {tuple(images.shape)}")
    size = _output_size(images, output_size)
    swap = _swap_index(num_classes, flip_pairs) if flip else None
    dtype = _model_dtype(model)
    kwargs = dict(num_classes=num_classes, align_corners=align_corners, mode=mode, crop_size=crop_size,
                  stride=stride, softmax=bool(softmax_before_resize))
    total, terms = None, 0
    for s in tuple(scales) if scales else (1.0,):
        x = F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=align_corners)
        if dtype is not None:  # the toolbox casts each pass's input to its parameters' dtype
            x = x.to(dtype)
        passes = [_toolbox_pass(model, x, **kwargs)]
        if flip:
            flipped = _toolbox_pass(model, x.flip(3), **kwargs)
            passes.append((flipped[:, swap] if swap is not None else flipped).flip(3))
        for scores in passes:
            if scores.shape[1] != num_classes:
                raise ValueError(f"the model gives {scores.shape[1]} class scores, the card says {num_classes}")
            resized = F.interpolate(scores, size=size, mode="bilinear", align_corners=align_corners)
            total = resized if total is None else total.add_(resized)  # sum() starts at 0: 0 + a is a
            terms += 1
    return total / terms


@torch.inference_mode()
def infer_labels(model: Model, images: torch.Tensor, *, num_classes: int, align_corners: bool,
                 output_size: Sequence[int] | None = None, **settings) -> torch.Tensor:
    """N x H x W int32 labels, ``class_argmax(infer_logits(...))`` (same arguments), faster: with one scale
    on the CPU the scores are not resized in full (``resize_argmax``: the argmax is proved from the two
    source rows around an output pixel where both agree by a safe margin, and computed where they do not).
    These are the labels of a float32 bilinear resize that differs from ATen's by about one rounding per
    value, so the two label maps can differ only at exact near-ties of two classes."""
    from .resize_argmax import applies, resized_argmax

    scales = tuple(settings.get("scales") or (1.0,))
    if len(scales) > 1:
        return class_argmax(infer_logits(model, images, num_classes=num_classes, align_corners=align_corners,
                                         output_size=output_size, **settings))
    size = _output_size(images, output_size)
    # one scale: its scores (a flipped pass summed in; halving would not move the argmax) resized once
    ((scores, _),) = _scale_scores(model, images, num_classes=num_classes, align_corners=align_corners,
                                   **settings)
    if tuple(scores.shape[2:]) == size:
        return class_argmax(scores)
    if applies(scores, size):
        return resized_argmax(scores, size, align_corners)
    return class_argmax(_resize(scores, size, align_corners))


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """N x H x W int32 index of the best class (the first of tied ones) of scores N x C x H x W. Reducing over
    the channels of an NCHW tensor strides through memory (10x slower on the CPU than the channels-last copy)."""
    return scores.contiguous(memory_format=torch.channels_last).argmax(dim=1).to(torch.int32)


def labels_and_confidence(scores: torch.Tensor, probabilities: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """N x H x W int32 labels and float32 max class probability from averaged scores N x C x H x W
    (``probabilities``: already averaged probabilities, as ``softmax_before_resize`` gives)."""
    scores = scores.contiguous(memory_format=torch.channels_last)
    labels = scores.argmax(dim=1, keepdim=True)  # argmax: the first of tied classes, as predict picks it
    best = scores.gather(1, labels)
    labels = labels[:, 0].to(torch.int32)
    if probabilities:
        return labels, best[:, 0]
    # max softmax = 1 / sum(exp(s - max)), without a second full-size tensor
    return labels, (scores - best).exp_().sum(dim=1).reciprocal_()


def predict_labels(model: Model, image_rgb: ImageSource, *, resize: Mapping | None, mean: Sequence[float],
                   std: Sequence[float], device: torch.device | str | None = None, return_scores: bool = False,
                   **infer_kwargs):
    """H x W int32 label map at the image's own size: the toolbox's full test pipeline (read, Resize,
    Normalize, TTA scores resized back to the original size and averaged, argmax). ``image_rgb``: an HxWx3
    uint8 RGB array, or anything ``read_image`` takes. ``infer_kwargs``: as for ``infer_logits``.
    ``return_scores``: (labels, H x W float32 max class probability)."""
    image = image_rgb if isinstance(image_rgb, np.ndarray) and image_rgb.ndim == 3 and image_rgb.shape[2] == 3 \
        and image_rgb.dtype == np.uint8 else read_image(image_rgb)
    device = torch.device(device) if device is not None else _model_device(model)
    x = preprocess(image, resize, mean, std).to(device)
    with torch.inference_mode():
        if not return_scores:
            return infer_labels(model, x, output_size=image.shape[:2], **infer_kwargs)[0].cpu().numpy()
        scores = infer_logits(model, x, output_size=image.shape[:2], **infer_kwargs)
        labels, confidence = labels_and_confidence(scores, bool(infer_kwargs.get("softmax_before_resize")))
    return labels[0].cpu().numpy(), confidence[0].cpu().numpy()
