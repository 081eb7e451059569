"""HR-Dv2: high-resolution features from a shift (and flip/rotation) ensemble of a ViT.

For each image and each transform ``T``: run the backbone on ``T(image)``, then, for every output
cell, sample the low-resolution feature map bilinearly at the place where ``T`` moved the cell's
centre, with feature ``i`` centred at ``i * stride + (patch_size - 1) / 2``. That one sampling step
is "resize, then undo the transform", exact at any output stride; the mean over transforms is the
HR-Dv2 feature map.

Sampling is separable: a y pass on the small feature map, then an x pass to full size. Views
whose x pass is the same (e.g. shifts with equal ``dx``) are summed after their y pass so they
share one x pass, and results are accumulated in place in float32, so memory stays
O(one output map) whatever the number of transforms.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import valid_size
from .errors import ConfigError, InputError
from .transforms import AxisCoords, Transform, TransformSet, grid_coords, pad_reflect, shifts

__all__ = ["highres_features", "output_shape"]

log = logging.getLogger(__name__)

# Channel chunk so that one x-pass temporary stays around this many bytes.
_X_PASS_BYTES = 32 * 2**20


@dataclass(frozen=True)
class _Lerp:
    """Bilinear taps along one feature axis: ``out = f[i0] + w * (f[i1] - f[i0])``."""

    axis: int  # feature-map axis (0 = rows of the feature grid, 1 = columns)
    i0: torch.Tensor
    i1: torch.Tensor
    w: torch.Tensor
    key: tuple  # equal keys, equal taps: views with the same x taps share one x pass


def _lerp_taps(
    coords: AxisCoords, n_grid: int, patch_size: int, stride: int, device: torch.device
) -> _Lerp:
    """Bilinear taps on a grid of ``n_grid`` patches for pixel coordinates ``coords``."""
    t = (coords.values - (patch_size - 1) / 2) / stride
    t = np.clip(t, 0.0, n_grid - 1)
    i0 = np.minimum(np.floor(t), n_grid - 1).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_grid - 1)
    w = (t - i0).astype(np.float32)
    return _Lerp(
        coords.axis,
        torch.from_numpy(i0).to(device),
        torch.from_numpy(i1).to(device),
        torch.from_numpy(w).to(device),
        key=(coords.axis, n_grid, i0.tobytes(), w.tobytes()),
    )


def _lerp(feats: torch.Tensor, taps: _Lerp, dim: int) -> torch.Tensor:
    """Apply ``taps`` along tensor dimension ``dim`` of ``feats``."""
    shape = [1] * feats.dim()
    shape[dim] = -1
    a = feats.index_select(dim, taps.i0)
    b = feats.index_select(dim, taps.i1)
    return a.add_(b.sub_(a).mul_(taps.w.view(shape)))


def _resolve_transforms(transforms, patch_size: int) -> TransformSet:
    if transforms is None:
        return shifts(patch_size=patch_size)
    if isinstance(transforms, TransformSet):
        return transforms
    if isinstance(transforms, Transform):
        return TransformSet([transforms])
    return TransformSet(transforms)


def output_shape(shape: tuple[int, int], out_stride: int = 1) -> tuple[int, int]:
    """Feature-map size ``(Y, X)`` for an image of ``shape`` at ``out_stride``.

    >>> output_shape((500, 333), 14)
    (36, 24)
    """
    return (-(-shape[0] // out_stride), -(-shape[1] // out_stride))


def _device_of(backbone, images: torch.Tensor) -> torch.device:
    dev = getattr(backbone, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(backbone, torch.nn.Module):
        for p in backbone.parameters():
            return p.device
    return images.device


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Accumulator:
    """Sums sampled views into one float32 map per image, sharing x passes between views."""

    def __init__(self, out: torch.Tensor, max_pending_bytes: int) -> None:
        self.out = out  # (B, C, Y, X)
        self.pending: dict[tuple, tuple[torch.Tensor, _Lerp, bool]] = {}
        self.pending_bytes = 0
        self.max_pending_bytes = max_pending_bytes

    def add(self, b: int, feats: torch.Tensor, taps_y: _Lerp, taps_x: _Lerp) -> None:
        """Add one view's features ``(C, h, w)`` for image ``b``."""
        # y pass on the small map: along the feature axis that output rows come from.
        g = _lerp(feats, taps_y, 1 + taps_y.axis)
        swapped = taps_y.axis == 1
        key = (b, tuple(g.shape), taps_x.key)
        if key in self.pending:
            self.pending[key][0].add_(g)
        else:
            self.pending[key] = (g, taps_x, swapped)
            self.pending_bytes += g.numel() * g.element_size()
            if self.pending_bytes > self.max_pending_bytes:
                self.flush()

    def flush(self) -> None:
        """Run the pending x passes into the output maps."""
        for (b, _, _), (g, taps_x, swapped) in self.pending.items():
            target = self.out[b].transpose(1, 2) if swapped else self.out[b]
            # g is (C, Y, w) (or (C, h, Y) when the view swapped axes): x pass along the other.
            dim = 1 if swapped else 2
            c = g.shape[0]
            per_channel = target[0].numel() * 4 * 3
            step = max(1, min(c, _X_PASS_BYTES // max(per_channel, 1)))
            for c0 in range(0, c, step):
                part = _lerp(g[c0 : c0 + step], taps_x, dim)
                target[c0 : c0 + step].add_(part)
        self.pending.clear()
        self.pending_bytes = 0


def highres_features(
    images: torch.Tensor,
    backbone,
    transforms: TransformSet | Sequence[Transform] | None = None,
    out_stride: int = 1,
    batch_size: int | None = None,
) -> torch.Tensor:
    """High-resolution features of a batch of images with the HR-Dv2 ensemble.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` or ``(3, H, W)`` normalised images (see :func:`normalize`), any size.
    backbone : Backbone or MeanPool or any backbone-like object
        Has ``patch_size``, ``stride``, ``embed_dim`` and maps ``(n, 3, h*, w*)`` to
        ``(n, C, h, w)``.
    transforms : TransformSet or sequence of Transform, optional
        Default: :func:`shifts` (identity and 1 px shifts in the 8 directions, 9 views).
    out_stride : int, optional
        Pixels per output cell; 1 gives one feature per pixel.
    batch_size : int, optional
        Transformed images per backbone call. Default: all transforms of an image in one call on
        CUDA; at most 4 on CPU, where bigger batches run slower per image.

    Returns
    -------
    torch.Tensor
        ``(B, C, ceil(H / out_stride), ceil(W / out_stride))`` float32 (no batch axis for a
        3-D input), on the backbone's device.
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"highres_features takes a torch.Tensor (B, 3, H, W), got {type(images).__name__}; "
            "convert images with hrdv2_dask.normalize(array) first."
        )
    single = images.dim() == 3
    batch = images[None] if single else images
    if batch.dim() != 4 or batch.shape[1] != 3 or batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise InputError(
            f"images must be (B, 3, H, W) or (3, H, W) with H, W > 0, got {tuple(images.shape)}."
        )
    if int(out_stride) != out_stride or out_stride < 1:
        raise ConfigError(f"out_stride must be a positive integer, got {out_stride!r}.")
    patch, stride = int(backbone.patch_size), int(backbone.stride)
    tset = _resolve_transforms(transforms, patch)
    if tset.max_shift_px * 2 >= patch:
        raise ConfigError(
            f"Shifts up to {tset.max_shift_px} px are too large for patch size {patch}: "
            f"use |shift| < {patch / 2:g}."
        )
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}.")
    device = _device_of(backbone, batch)
    batch_size = batch_size or (len(tset) if device.type == "cuda" else min(len(tset), 4))
    n, _, h, w = batch.shape
    padded = (valid_size(h, patch, stride), valid_size(w, patch, stride))
    out_hw = output_shape((h, w), out_stride)
    base = (AxisCoords(0, grid_coords(h, out_stride)), AxisCoords(1, grid_coords(w, out_stride)))
    views = []
    for t in tset:
        shape_t = t.output_shape(padded)
        cy, cx = t.map_coords(base, padded)
        grid = [(s - patch) // stride + 1 for s in shape_t]
        views.append(
            (
                t,
                shape_t,
                _lerp_taps(cy, grid[cy.axis], patch, stride, device),
                _lerp_taps(cx, grid[cx.axis], patch, stride, device),
            )
        )

    out = None
    acc = None
    # Work items in order of image, then output shape of the transform, so batches are uniform.
    items = sorted(
        ((b, v) for b in range(n) for v in range(len(views))), key=lambda i: (i[0], views[i[1]][1])
    )
    chunks: list[list[tuple[int, int]]] = []
    for item in items:
        if (
            chunks
            and len(chunks[-1]) < batch_size
            and views[chunks[-1][-1][1]][1] == views[item[1]][1]
        ):
            chunks[-1].append(item)
        else:
            chunks.append([item])

    with torch.inference_mode():
        src = pad_reflect(batch.to(device, torch.float32), padded)
        for chunk in chunks:
            x = torch.stack([views[v][0].apply(src[b]) for b, v in chunk])
            with _autocast(device):
                feats = backbone(x)
            feats = feats.float()
            if out is None:
                out = torch.zeros((n, feats.shape[1], *out_hw), dtype=torch.float32, device=device)
                map_bytes = out[0].numel() * 4
                acc = _Accumulator(out, max_pending_bytes=max(map_bytes // 2, 1))
            for (b, v), f in zip(chunk, feats, strict=True):
                acc.add(b, f, views[v][2], views[v][3])
            del x, feats
        acc.flush()
        out /= len(views)
    return out[0] if single else out
