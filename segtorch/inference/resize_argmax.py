"""``argmax(bilinear_resize(scores))`` for upsampling, without the full-size scores.

The label maps ``predict`` returns are the argmax over classes of scores at the model's stride (1/8 of the
input) resized to the original image: with 6 classes and a 640x480 image that is 1.8 M interpolated values
for 0.3 M labels, and on the CPU the resize and the argmax took as long as a third of the demo model's forward
pass. Here the resize is split in two: each source row is first resized in width (by ATen's kernel), then
every output row is ``row0 * w0 + row1 * w1`` of the two source rows around it, with ATen's weights (this
differs from ATen's one-pass resize by about one float32 rounding per value). Between two source rows ("a
band") an output pixel's scores are a convex combination of the two rows' scores at its column; where both
rows pick the same class by a margin far above float rounding, every output pixel of that band and column
picks it too. Only the other band columns (near class boundaries: 8% of the demo's) are computed in full.
The labels are those of the full two-pass computation, exactly: the margin test only skips pixels whose
argmax it proves.
"""
from __future__ import annotations

import numpy as np
import torch

# A skipped pixel's best class leads the runner-up by more than this fraction of the largest |score| in both
# of its source rows: the two float roundings of ``row0 * w0 + row1 * w1`` move a difference by at most
# ~2.4e-7 of it (2^-22), so the winner cannot change. (2^-16: a 64x margin over that bound.)
_MARGIN = 2.0 ** -16


def applies(scores: torch.Tensor, size) -> bool:
    """Whether ``resized_argmax`` serves these scores: float32/64 on the CPU, upsampled in both directions
    (not to the same size). On GPUs the full resize is cheap and finding the boundary pixels would
    synchronise; reduced-precision scores are resized in their own dtype, with its ties, by the plain path."""
    h, w = scores.shape[2:]
    return (scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64)
            and scores.shape[1] >= 2 and int(size[0]) >= h and int(size[1]) >= w
            and (int(size[0]), int(size[1])) != (h, w))


def source_rows(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index0, index1, weight0, weight1) of each output row of a bilinear resize n_in -> n_out, as ATen's
    CPU kernel computes them: the source coordinate ``scale * (i + 0.5) - 0.5`` (``scale * i`` with
    ``align_corners``) rounded once to the scores' precision (the kernel's fused multiply-add), clamped to
    the image, its floor and its fraction."""
    i = np.arange(n_out, dtype=np.float64)
    real = np.float32 if dtype == torch.float32 else np.float64
    if align_corners:
        scale = real((n_in - 1) / (n_out - 1)) if n_out > 1 else real(0)
        src = (np.float64(scale) * i).astype(real)
    else:
        scale = real(real(n_in) / real(n_out))
        src = np.maximum((np.float64(scale) * (i + 0.5) - 0.5).astype(real), real(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(real), 0, 1).astype(real)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return (torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy((real(1) - lam).astype(real)),
            torch.from_numpy(lam))


def width_pass(scores: torch.Tensor, width: int, align_corners: bool) -> torch.Tensor:
    """N x C x h x ``width``: every source row resized in width by ATen's kernel (NCHW), the height kept
    (a resize to the same height has weights 1 and 0: each row exactly)."""
    return torch.nn.functional.interpolate(scores.contiguous(), size=(scores.shape[2], width), mode="bilinear",
                                           align_corners=align_corners)


def height_pass(rows: torch.Tensor, height: int, align_corners: bool) -> torch.Tensor:
    """The full resize's second pass, N x C x ``height`` x W: every output row ``row0 * w0 + row1 * w1``
    (what the shortcut below skips; tests compare with it)."""
    y0, y1, w0, w1 = source_rows(rows.shape[2], height, align_corners, rows.dtype)
    return rows.index_select(2, y0) * w0[:, None] + rows.index_select(2, y1) * w1[:, None]


def resized_argmax(scores: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """N x H x W int32: ``argmax(height_pass(width_pass(scores)))`` over the classes (the first of tied
    ones), for scores N x C x h x w that ``applies`` accepts. Band columns with NaN or infinite scores are
    never skipped."""
    height, width = int(size[0]), int(size[1])
    rows = width_pass(scores, width, align_corners)  # N x C x h x W
    n, _, h, _ = rows.shape
    # each source row's best class (N x h x W) and its margin over the runner-up: the largest score, then the
    # largest of the others (topk(2) took 2-3x as long). Where classes tie, the margin is 0 and the band
    # column is computed in full, so which of them ``best`` names does not matter.
    top_score, best = rows.max(dim=1)
    margin = top_score - rows.scatter(1, best[:, None], float("-inf")).amax(dim=1)
    best = best.to(torch.int32)
    biggest = rows.abs().amax(dim=1)
    y0, _, w0, w1 = source_rows(h, height, align_corners, rows.dtype)
    below = torch.clamp(torch.arange(h) + 1, max=h - 1)  # a band's second source row (the last band: itself)
    # a band column is decided where both rows pick one class, each by a margin above the rounding of scores
    # as large as either row's (NaN and infinite margins fail the test)
    scale = _MARGIN * torch.maximum(biggest, biggest.index_select(1, below))
    decided = ((best == best.index_select(1, below)) & (margin > scale)
               & (margin.index_select(1, below) > scale))  # N x h x W
    labels = best.index_select(1, y0)  # N x H x W: each output row its band's first row's classes
    rows_per_band = torch.bincount(y0, minlength=h)
    decided[:, rows_per_band == 0] = True  # bands no output row falls in
    n_idx, band, col = (~decided).nonzero(as_tuple=True)
    if n_idx.numel():
        # each band's output rows and their weights (h x B tables), padded to the longest band by repeating its
        # last row (the same value is then written twice); gathered per column from these small tables
        first = torch.cumsum(rows_per_band, 0) - rows_per_band
        offsets = torch.arange(int(rows_per_band.max()))
        band_rows = first[:, None] + torch.minimum(offsets[None], rows_per_band[:, None] - 1)  # h x B
        out_rows = band_rows.index_select(0, band)  # K x B
        top_row = rows[n_idx, :, band, col]  # K x C
        bottom_row = rows[n_idx, :, below[band], col]
        values = (top_row[:, None, :] * w0[band_rows].index_select(0, band)[:, :, None]
                  + bottom_row[:, None, :] * w1[band_rows].index_select(0, band)[:, :, None])  # K x B x C
        flat = (n_idx * (height * width) + col)[:, None] + out_rows * width  # into labels (N x H x W)
        labels.view(-1).index_put_((flat.view(-1),), values.argmax(dim=2).to(torch.int32).view(-1))
    return labels
