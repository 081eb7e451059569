"""HR-Dv2: high-resolution features from a shift (and flip/rotation) ensemble of a ViT.

For each image and each transform ``T``: run the backbone on ``T(image)``, then, for every output
cell, sample the low-resolution feature map bilinearly at the place where ``T`` moved the cell's
centre, with feature ``i`` centred at ``i * stride + (patch_size - 1) / 2``. That one sampling step
is "resize, then undo the transform", exact at any output stride; the mean over transforms is the
HR-Dv2 feature map.

Sampling is separable: a y pass on the small feature map, then an x pass to full size. Views
whose x pass is the same (e.g. shifts with equal ``dx``) are summed after their y pass so they
share one x pass, and all x passes of an image run as one matrix product with the dense
bilinear matrices (two non-zeros a row) straight into a float32 accumulator, so memory stays
O(one output map) whatever the number of transforms. A linear head (PCA projection, linear
classifier) runs on the low-resolution maps before any of this (see :mod:`hrdv2_dask.heads`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import valid_size
from .errors import ConfigError, InputError
from .heads import LinearHead
from .precision import autocast, resolve_precision
from .transforms import AxisCoords, Transform, TransformSet, grid_coords, pad_reflect, shifts

__all__ = ["highres_features", "output_shape", "position_bias"]

log = logging.getLogger(__name__)

# Channel chunk so that one x-pass temporary stays around this many bytes.
_X_PASS_BYTES = 32 * 2**20
# Devices whose fused x pass runs with bf16 operands on the tensor cores (fp32 accumulation).
_BF16_GEMM_DEVICES = ("cuda",)


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


def _dense_taps(taps: _Lerp, n_grid: int) -> torch.Tensor:
    """``taps`` as a dense ``(n_grid, n_out)`` matrix ``R`` so that ``out = f @ R``."""
    n_out = taps.w.shape[0]
    r = torch.zeros((n_out, n_grid), dtype=torch.float32, device=taps.w.device)
    rows = torch.arange(n_out, device=taps.w.device)
    r.index_put_((rows, taps.i0), 1.0 - taps.w, accumulate=True)
    r.index_put_((rows, taps.i1), taps.w, accumulate=True)
    return r.T


class _Accumulator:
    """Sums sampled views into one float32 map per image, sharing x passes between views.

    Each view gets its y pass on the small feature map at once; views with the same x taps are
    summed and wait for one shared x pass. ``fused`` runs the x passes of all pending groups of an
    image as one matrix product ``out += [g_1 .. g_k] @ [R_1; ..; R_k]`` (the dense bilinear
    matrices, two non-zeros a row): on a GPU this is one tensor-core GEMM instead of several
    memory-bound gathers over the full-size map. The reference path gathers (``index_select``).
    """

    def __init__(
        self, out: torch.Tensor, max_pending_bytes: int, *, fused: bool, bf16: bool = True
    ) -> None:
        self.out = out  # (B, C, Y, X)
        self.bf16 = bf16  # bf16 GEMM operands where the device runs them on tensor cores
        self.pending: dict[tuple, tuple[torch.Tensor, _Lerp, bool]] = {}
        self.pending_bytes = 0
        self.max_pending_bytes = max_pending_bytes
        self.fused = fused

    def add(self, b: int, feats: torch.Tensor, taps_y: _Lerp, taps_x: _Lerp) -> None:
        """Add one view's features ``(C, h, w)`` for image ``b``."""
        # y pass on the small map: along the feature axis that output rows come from.
        g = _lerp(feats, taps_y, 1 + taps_y.axis)
        swapped = taps_y.axis == 1
        if swapped and self.fused:
            # (C, h, Y) -> (C, Y, h): the x pass then runs along the last axis like the others.
            g, swapped = g.transpose(1, 2).contiguous(), False
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
        if self.fused:
            for b in sorted({key[0] for key in self.pending}):
                self._flush_fused(b)
        else:
            for (b, _, _), (g, taps_x, swapped) in self.pending.items():
                self._flush_gather(b, g, taps_x, swapped)
        self.pending.clear()
        self.pending_bytes = 0

    def _channel_step(self, per_channel_bytes: int, c: int) -> int:
        return max(1, min(c, _X_PASS_BYTES // max(per_channel_bytes, 1)))

    def _flush_gather(self, b: int, g: torch.Tensor, taps_x: _Lerp, swapped: bool) -> None:
        target = self.out[b].transpose(1, 2) if swapped else self.out[b]
        # g is (C, Y, w) (or (C, h, Y) when the view swapped axes): x pass along the other.
        dim = 1 if swapped else 2
        c = g.shape[0]
        step = self._channel_step(target[0].numel() * 4 * 3, c)
        for c0 in range(0, c, step):
            target[c0 : c0 + step].add_(_lerp(g[c0 : c0 + step], taps_x, dim))

    def _flush_fused(self, b: int) -> None:
        groups = [(g, t) for key, (g, t, _) in self.pending.items() if key[0] == b]
        h = torch.cat([g for g, _ in groups], dim=2)  # (C, Y, sum of widths)
        r = torch.cat([_dense_taps(t, g.shape[2]) for g, t in groups], dim=0)  # (sum, X)
        target = self.out[b]  # (C, Y, X), contiguous
        c, y, x = target.shape
        if not self.bf16 or target.device.type not in _BF16_GEMM_DEVICES:
            target.view(c * y, x).addmm_(h.reshape(c * y, -1), r)
            return
        # bf16 operands on the tensor cores, fp32 accumulation in the GEMM and in ``out``.
        r16 = r.to(torch.bfloat16)
        step = self._channel_step(y * x * 2, c)
        for c0 in range(0, c, step):
            part = h[c0 : c0 + step].to(torch.bfloat16) @ r16
            target[c0 : c0 + step].add_(part)


def _plan_views(tset: TransformSet, padded, out_hw_coords, patch: int, stride: int, device):
    """Per transform: (transform, transformed shape, y taps, x taps)."""
    views = []
    for t in tset:
        shape_t = t.output_shape(padded)
        cy, cx = t.map_coords(out_hw_coords, padded)
        grid = [(s - patch) // stride + 1 for s in shape_t]
        views.append(
            (
                t,
                shape_t,
                _lerp_taps(cy, grid[cy.axis], patch, stride, device),
                _lerp_taps(cx, grid[cx.axis], patch, stride, device),
            )
        )
    return views


def _batches(n: int, views, batch_size: int) -> list[list[tuple[int, int]]]:
    """Work items ``(image, view)`` in batches of equal transformed shape."""
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
    return chunks


@dataclass(frozen=True)
class _Setup:
    """Checked arguments shared by :func:`highres_features` and :func:`position_bias`."""

    batch: torch.Tensor
    single: bool
    backbone: object
    tset: TransformSet
    device: torch.device
    batch_size: int
    padded: tuple[int, int]
    precision: str  # "fp32" or "bf16", resolved on the device

    @property
    def patch(self) -> int:
        return int(self.backbone.patch_size)

    @property
    def stride(self) -> int:
        return int(self.backbone.stride)


def _setup(images, backbone, transforms, batch_size, precision: str = "auto") -> _Setup:
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
    h, w = batch.shape[-2:]
    padded = (valid_size(h, patch, stride), valid_size(w, patch, stride))
    precision = resolve_precision(precision, str(device))
    return _Setup(batch, single, backbone, tset, device, batch_size, padded, precision)


def _view_features(s: _Setup, views, chunks) -> Iterator[tuple[list, torch.Tensor]]:
    """Backbone features ``(n, C, h, w)`` float32 of each batch of transformed images."""
    src = pad_reflect(s.batch.to(s.device, torch.float32, non_blocking=True), s.padded)
    for chunk in chunks:
        x = torch.stack([views[v][0].apply(src[b]) for b, v in chunk])
        if s.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(s.precision, s.device):
            feats = s.backbone(x)
        yield chunk, feats.float()


def _check_bias(token_bias, views, channels: int, device) -> list[torch.Tensor]:
    if len(token_bias) != len(views):
        raise ConfigError(
            f"token_bias has {len(token_bias)} maps but there are {len(views)} transforms; "
            "estimate it with position_bias() for the same transforms."
        )
    maps = [torch.as_tensor(np.asarray(b), device=device, dtype=torch.float32) for b in token_bias]
    if any(m.dim() != 3 or m.shape[0] != channels for m in maps):
        raise ConfigError(
            f"token_bias maps must be (C, h, w) with the backbone's C = {channels} channels, got "
            f"{[tuple(m.shape) for m in maps][:3]}...; estimate them with position_bias() for "
            "this backbone."
        )
    return maps


def highres_features(
    images: torch.Tensor,
    backbone,
    transforms: TransformSet | Sequence[Transform] | None = None,
    out_stride: int = 1,
    batch_size: int | None = None,
    *,
    head: LinearHead | None = None,
    token_bias: Sequence[np.ndarray | torch.Tensor] | None = None,
    fused: bool = True,
    precision: str = "auto",
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
    head : LinearHead, optional
        Affine map applied to each view's low-resolution features before resampling (linear
        first: the same result as applying it to the output, at a fraction of the cost); the
        output then has ``head.out_channels`` channels.
    token_bias : sequence of array, optional
        One ``(C, h, w)`` map per transform, subtracted from that view's backbone features (the
        positional artefact estimated by :func:`position_bias`).
    fused : bool, optional
        Resample with one matrix product per image (default) instead of the reference gathers;
        both give the same result to float32 rounding (bf16 operands on CUDA under bf16).
    precision : {"auto", "fp32", "bf16"}, optional
        The backbone's arithmetic: ``auto`` is bf16 autocast (fp32 accumulation) on CUDA and on
        CPUs with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere
        (:func:`hrdv2_dask.precision.resolve_precision`). Resampling and averaging are fp32.

    Returns
    -------
    torch.Tensor
        ``(B, C, ceil(H / out_stride), ceil(W / out_stride))`` float32 (no batch axis for a
        3-D input), on the backbone's device.
    """
    if int(out_stride) != out_stride or out_stride < 1:
        raise ConfigError(f"out_stride must be a positive integer, got {out_stride!r}.")
    s = _setup(images, backbone, transforms, batch_size, precision)
    n, _, h, w = s.batch.shape
    out_hw = output_shape((h, w), out_stride)
    base = (AxisCoords(0, grid_coords(h, out_stride)), AxisCoords(1, grid_coords(w, out_stride)))
    views = _plan_views(s.tset, s.padded, base, s.patch, s.stride, s.device)
    bias = None
    out = acc = None
    with torch.inference_mode():
        for chunk, feats in _view_features(s, views, _batches(n, views, s.batch_size)):
            if token_bias is not None:
                bias = bias or _check_bias(token_bias, views, feats.shape[1], s.device)
                feats = feats - torch.stack([bias[v] for _, v in chunk])
            if head is not None:
                feats = head.apply(feats)
            if out is None:
                out = torch.zeros(
                    (n, feats.shape[1], *out_hw), dtype=torch.float32, device=s.device
                )
                map_bytes = out[0].numel() * 4
                acc = _Accumulator(
                    out,
                    max_pending_bytes=max(map_bytes // 2, 1),
                    fused=bool(fused),
                    bf16=s.precision == "bf16",
                )
            for (b, v), f in zip(chunk, feats, strict=True):
                acc.add(b, f, views[v][2], views[v][3])
            del feats
        acc.flush()
        out /= len(views)
    return out[0] if s.single else out


def position_bias(
    images: torch.Tensor,
    backbone,
    transforms: TransformSet | Sequence[Transform] | None = None,
    batch_size: int | None = None,
    *,
    precision: str = "auto",
) -> list[torch.Tensor]:
    """The positional artefact of a backbone on windows of one size, per transform.

    ViTs add the same positional embeddings to every window, which leaves a pattern that depends
    on the position within the window, not on the content; tiled at the window stride it becomes
    a periodic artefact on flat images. Averaged over many windows, content averages out and the
    pattern remains: ``bias_v(p) = mean_windows f_v(p) - mean_{windows, p} f_v(p)`` for each
    transform ``v`` and low-resolution position ``p`` (the overall mean is kept).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` normalised windows, all of the size the bias will be used with; the more
        (and the more varied), the better the estimate.
    backbone, transforms, batch_size, precision
        As in :func:`highres_features`.

    Returns
    -------
    list of torch.Tensor
        One ``(C, h, w)`` float32 map per transform, for ``highres_features(token_bias=...)``.
    """
    s = _setup(images, backbone, transforms, batch_size, precision)
    n = s.batch.shape[0]
    base = (AxisCoords(0, grid_coords(s.padded[0], 1)), AxisCoords(1, grid_coords(s.padded[1], 1)))
    views = _plan_views(s.tset, s.padded, base, s.patch, s.stride, s.device)
    sums: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for chunk, feats in _view_features(s, views, _batches(n, views, s.batch_size)):
            for (_, v), f in zip(chunk, feats, strict=True):
                sums[v] = f if v not in sums else sums[v] + f
    out = []
    for v in range(len(views)):
        mean = sums[v] / n
        out.append(mean - mean.mean(dim=(1, 2), keepdim=True))
    return out
