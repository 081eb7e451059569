"""``core`` suite: the HR-Dv2 step in memory against the backbone alone and the naive recipe.

For each image size ``S`` and number of views ``n``, on one random image ``(1, 3, S, S)``:

backbone only
    the same ``n`` transformed views through the backbone, in the batches the ensemble uses
    (``--batch-size``, default as :func:`hrdv2_dask.highres_features`: all views in one call on
    CUDA, 4 on CPU), nothing else;
``highres_features``
    the whole step: views, backbone, exact resampling to the pixel grid, mean;
naive
    the recipe of the original code (DESIGN.md, "Measured anchors"): per view,
    ``F.interpolate`` of the low-resolution map to full size (bilinear, fp32), undo the
    transform (``torch.flip``; ``torch.roll`` for periodic shifts, the equivalent gather for the
    default reflect shifts), then ``torch.stack`` of all views and ``.mean(0)``. It needs about
    ``2 n + 2`` full-size maps; points that would not fit in 80 % of the free memory are skipped
    and say so.

Times are the best of ``--repeats`` calls (all are in the JSON; the methods take turns),
synchronised on CUDA. The backbone runs at ``--precision`` (default ``auto``: bf16 autocast on
CUDA and on CPUs with native bf16, as ``highres_features``; the table caption names it).
On CUDA one full-size call of each method is a warm-up; on CPU one small warm-up call per
method precedes the measurements.
Peak memory of ``highres_features`` and of the naive recipe is measured in a fresh process per
point: the growth of the host's peak RSS over the call (Linux: peak reset between the two
methods; elsewhere one process per method) and, on CUDA, of ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import logging
from typing import Any

import psutil
import torch
import torch.nn.functional as F

import hrdv2_dask as hd
from hrdv2_dask.backbones import valid_size
from hrdv2_dask.precision import autocast
from hrdv2_dask.transforms import pad_reflect

from .common import (
    BackboneSpec,
    Column,
    can_reset_peak_rss,
    environment,
    environment_line,
    markdown_table,
    parse_int_list,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    synchronize,
    time_calls,
    view_set,
)

__all__ = ["add_arguments", "naive_features", "run", "run_core", "to_markdown"]

log = logging.getLogger(__name__)

FULL = {"sizes": [224, 518, 1022], "views": [1, 5, 9, 17, 68]}
QUICK = {"sizes": [518], "views": [1, 9, 17], "repeats": 2}
METHODS = ("ensemble", "naive")
TARGET = 1.3  # issue "Speed at gigapixel scale": CPU ensemble step within 1.3x of backbone only


def default_batch_size(n_views: int, device: str) -> int:
    """Views per backbone call: the default of :func:`hrdv2_dask.highres_features`.

    >>> default_batch_size(17, "cpu"), default_batch_size(17, "cuda")
    (4, 17)
    """
    return n_views if device.startswith("cuda") else min(n_views, 4)


def _view_batches(
    image: torch.Tensor, backbone, tset: hd.TransformSet, batch_size: int
) -> list[tuple[list, torch.Tensor, tuple[int, int]]]:
    """``(transforms, stacked views, padded shape)`` per backbone call, as the ensemble batches.

    ``image`` is ``(1, 3, H, W)``; it is reflect-padded to the patch grid first, and views are
    grouped by their shape (rotations of non-square images change it).
    """
    patch, stride = int(backbone.patch_size), int(backbone.stride)
    h, w = image.shape[-2:]
    padded = (valid_size(h, patch, stride), valid_size(w, patch, stride))
    src = pad_reflect(image[0], padded)
    groups: dict[tuple[int, int], list] = {}
    for t in tset:
        groups.setdefault(t.output_shape(padded), []).append(t)
    batches = []
    for ts in groups.values():
        for i in range(0, len(ts), batch_size):
            chunk = ts[i : i + batch_size]
            batches.append((chunk, torch.stack([t.apply(src) for t in chunk]), padded))
    return batches


def _backbone_only(backbone, batches, device: str, precision: str) -> None:
    with torch.inference_mode():
        for _, views, _ in batches:
            with autocast(precision, device):
                backbone(views)


def naive_features(
    image: torch.Tensor,
    backbone,
    tset: hd.TransformSet,
    *,
    batch_size: int,
    precision: str = "auto",
) -> torch.Tensor:
    """The naive HR-Dv2 recipe: upsample every view to full size, undo it, stack, mean.

    Parameters
    ----------
    image : torch.Tensor
        ``(1, 3, H, W)`` normalised image on the backbone's device.
    backbone : Backbone or MeanPool
    tset : TransformSet
    batch_size : int
        Views per backbone call.
    precision : {"auto", "fp32", "bf16"}
        The backbone's arithmetic, as in :func:`hrdv2_dask.highres_features`.

    Returns
    -------
    torch.Tensor
        ``(C, H, W)`` float32. With stride = patch size, the bilinear ``align_corners=False``
        upsampling puts patch centres where :func:`hrdv2_dask.highres_features` does, so the two
        agree away from the image border.
    """
    h, w = image.shape[-2:]
    device = str(image.device)
    maps = []
    with torch.inference_mode():
        for chunk, views, padded in _view_batches(image, backbone, tset, batch_size):
            with autocast(precision, device):
                feats = backbone(views)
            feats = feats.float()
            for t, f in zip(chunk, feats, strict=True):
                size = t.output_shape(padded)
                up = F.interpolate(f[None], size=size, mode="bilinear", align_corners=False)
                maps.append(t.inverse().apply(up)[0, :, :h, :w].contiguous())
        return torch.stack(maps).mean(0)


def naive_bytes(n_views: int, channels: int, size: int) -> int:
    """Rough peak bytes of :func:`naive_features`: ``2 n + 2`` float32 maps of ``size**2``."""
    return (2 * n_views + 2) * channels * size * size * 4


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def _methods(tset: hd.TransformSet, batch_size: int, precision: str):
    """``{method: fn(image, backbone)}`` for the timed and memory-probed calls."""
    kw = {"batch_size": batch_size, "precision": precision}
    return {
        "ensemble": lambda x, bb: hd.highres_features(x, bb, tset, **kw),
        "naive": lambda x, bb: naive_features(x, bb, tset, **kw),
    }


def _warm_up(spec: BackboneSpec, backbone, tset, batch_size: int) -> None:
    """One call of each method on a small image: kernels, thread pools, allocator."""
    small = valid_size(3 * backbone.patch_size, backbone.patch_size, backbone.stride)
    x = torch.randn(1, 3, small, small, device=spec.device)
    for fn in _methods(tset, batch_size, spec.precision).values():
        fn(x, backbone)
    batches = _view_batches(x, backbone, tset, batch_size)
    _backbone_only(backbone, batches, spec.device, spec.precision)
    synchronize(spec.device)


def probe_memory(
    spec: BackboneSpec, *, size: int, n_views: int, methods: list[str], batch_size: int
) -> dict[str, dict[str, int | None]]:
    """Peak memory growth of each method on one ``size**2`` image (run in a fresh process).

    Returns
    -------
    dict
        ``{method: {"host_bytes": int, "device_bytes": int or None}}``.
    """
    torch.manual_seed(spec.seed)
    backbone = spec.build()
    _, tset = view_set(n_views)
    _warm_up(spec, backbone, tset, batch_size)
    fns = _methods(tset, batch_size, spec.precision)
    x = torch.randn(1, 3, size, size, device=spec.device)
    cuda = spec.device.startswith("cuda")
    result: dict[str, dict[str, int | None]] = {}
    for i, method in enumerate(methods):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            device_base = torch.cuda.memory_allocated()
        if not reset_peak_rss() and i > 0:
            raise RuntimeError("peak RSS cannot be reset here; probe one method per process.")
        base = rss_bytes()
        out = fns[method](x, backbone)
        synchronize(spec.device)
        result[method] = {
            # The kernel updates RSS high-water marks lazily (per-thread counters, up to
            # 64 pages off), so a call that allocates nothing new can read a little below 0.
            "host_bytes": max(0, peak_rss_bytes() - base),
            "device_bytes": torch.cuda.max_memory_allocated() - device_base if cuda else None,
        }
        del out
    return result


def _memory(spec, *, size, n_views, methods, batch_size) -> dict[str, dict[str, int | None]]:
    """:func:`probe_memory` in fresh processes: one for all methods where the peak RSS can be
    reset (Linux), else one per method."""
    groups = [list(methods)] if can_reset_peak_rss() else [[m] for m in methods]
    out: dict[str, dict[str, int | None]] = {}
    for group in groups:
        out.update(
            run_isolated(
                probe_memory,
                spec=spec,
                size=size,
                n_views=n_views,
                methods=group,
                batch_size=batch_size,
            )
        )
    return out


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def measure_point(
    spec: BackboneSpec,
    backbone,
    *,
    size: int,
    n_views: int,
    repeats: int,
    batch_size: int | None,
    memory: bool,
) -> dict[str, Any]:
    """Time backbone only, ``highres_features`` and the naive recipe at one (size, views)."""
    label, tset = view_set(n_views)
    bs = batch_size or default_batch_size(n_views, spec.device)
    log.info("core: %d px, %d views (%s), batch %d", size, n_views, label, bs)
    x = torch.randn(1, 3, size, size, device=spec.device)
    fns = _methods(tset, bs, spec.precision)
    batches = _view_batches(x, backbone, tset, bs)
    need = naive_bytes(n_views, backbone.embed_dim, size)
    budget = int(0.8 * _free_bytes(spec.device))
    naive_skip = (
        None
        if need <= budget
        else f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB available"
    )
    calls = {
        "backbone": lambda: _backbone_only(backbone, batches, spec.device, spec.precision),
        "ensemble": lambda: fns["ensemble"](x, backbone),
    }
    if naive_skip is None:
        calls["naive"] = lambda: fns["naive"](x, backbone)
    else:
        log.warning("core: naive recipe skipped at %d px, %d views: %s", size, n_views, naive_skip)
    if spec.device.startswith("cuda"):
        for fn in calls.values():
            time_calls(fn, repeats=1, device=spec.device)  # warm-up at full size
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):  # round robin, so that drifting load hits every method alike
        for name, fn in calls.items():
            times[name] += time_calls(fn, repeats=1, device=spec.device)
            gc.collect()
    best = {k: min(v) for k, v in times.items()}
    mp = size * size / 1e6
    row: dict[str, Any] = {
        "size": size,
        "views": n_views,
        "views_label": label,
        "batch_size": bs,
        "backbone_s": best["backbone"],
        "ensemble_s": best["ensemble"],
        "ratio": best["ensemble"] / best["backbone"],
        "ensemble_mps": mp / best["ensemble"],
        "naive_s": best.get("naive"),
        "naive_ratio": best["naive"] / best["backbone"] if "naive" in best else None,
        "naive_mps": mp / best["naive"] if "naive" in best else None,
        "naive_skipped": naive_skip,
        "output_map_mb": _mb(backbone.embed_dim * size * size * 4),
        "times_s": times,
    }
    if memory:
        methods = [m for m in METHODS if m in calls]
        peaks = _memory(spec, size=size, n_views=n_views, methods=methods, batch_size=bs)
        for m in METHODS:
            row[f"{m}_host_peak_mb"] = _mb(peaks[m]["host_bytes"]) if m in peaks else None
            row[f"{m}_device_peak_mb"] = _mb(peaks[m]["device_bytes"]) if m in peaks else None
    return row


def run_core(
    *,
    spec: BackboneSpec,
    sizes: list[int],
    views: list[int],
    repeats: int,
    batch_size: int | None = None,
    memory: bool = True,
) -> dict[str, Any]:
    """Measure every (size, views) point; returns the JSON-able result of the suite."""
    for n in views:
        view_set(n)  # fail early on an unknown view count
    backbone = spec.build()
    torch.manual_seed(spec.seed)
    _warm_up(spec, backbone, hd.shifts(), batch_size or default_batch_size(9, spec.device))
    rows = [
        measure_point(
            spec,
            backbone,
            size=size,
            n_views=n,
            repeats=repeats,
            batch_size=batch_size,
            memory=memory,
        )
        for size in sizes
        for n in views
    ]
    return {
        "suite": "core",
        "environment": environment(spec.device, weights=spec.weights_label),
        "settings": {
            "model": spec.model,
            "model_label": spec.describe(),
            "model_options": dict(spec.model_options),
            "device": spec.device,
            "precision": spec.resolved_precision,
            "precision_option": spec.precision,
            "sizes": sizes,
            "views": views,
            "repeats": repeats,
            "batch_size": batch_size or "default (all views on CUDA, 4 on CPU)",
            "out_stride": 1,
        },
        "rows": rows,
    }


COLUMNS = [
    Column("size", "size"),
    Column("views", "views"),
    Column("views_label", "transforms"),
    Column("batch_size", "batch"),
    Column("backbone_s", "backbone only (s)", "{:.3f}"),
    Column("ensemble_s", "`highres_features` (s)", "{:.3f}"),
    Column("ratio", "ratio", "{:.2f}"),
    Column("ensemble_mps", "MP/s", "{:.2f}"),
    Column("naive_s", "naive (s)", "{:.3f}"),
    Column("naive_ratio", "naive / backbone", "{:.2f}"),
    Column("ensemble_host_peak_mb", "peak RSS growth (MB)", "{:.0f}"),
    Column("naive_host_peak_mb", "naive peak RSS growth (MB)", "{:.0f}"),
]
CUDA_COLUMNS = [
    Column("ensemble_device_peak_mb", "peak GPU growth (MB)", "{:.0f}"),
    Column("naive_device_peak_mb", "naive peak GPU growth (MB)", "{:.0f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    """The suite's Markdown section: environment line, table, notes."""
    s = result["settings"]
    cuda = s["device"].startswith("cuda")
    table = markdown_table(result["rows"], COLUMNS + (CUDA_COLUMNS if cuda else []))
    notes = [
        f"- naive recipe skipped at {r['size']} px, {r['views']} views: {r['naive_skipped']}"
        for r in result["rows"]
        if r.get("naive_skipped")
    ]
    if not cuda:
        over = [f"{r['size']} px × {r['views']}" for r in result["rows"] if r["ratio"] > TARGET]
        notes.append(
            f"- target ratio ≤ {TARGET} on CPU: "
            + (f"missed at {', '.join(over)}" if over else "met at every point")
        )
    return "\n".join(
        [
            f"### Ensemble step vs backbone alone ({s['device']}, {s['precision']})",
            "",
            environment_line(result["environment"], speed_only=True),
            f"Model {s['model_label']}, one image per point, out_stride 1, best of {s['repeats']}; "
            "backbone only = the same views in the same batches; ratio = `highres_features` / "
            "backbone only.",
            "",
            table,
            *([""] + notes if notes else []),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=parse_int_list, help="image sides, e.g. 224,518,1022")
    parser.add_argument("--views", type=parse_int_list, help="view counts from 1,5,9,17,51,68")
    parser.add_argument(
        "--repeats", type=int, help="timed calls per point, best reported (default: 2 CPU, 5 CUDA)"
    )
    parser.add_argument("--batch-size", type=int, help="views per backbone call")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CPU preset: sizes {QUICK['sizes']}, views {QUICK['views']}, repeats 2",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    """Run the suite from parsed command-line arguments."""
    preset = QUICK if args.quick else FULL
    cuda = spec.device.startswith("cuda")
    return run_core(
        spec=spec,
        sizes=args.sizes or preset["sizes"],
        views=args.views or preset["views"],
        repeats=args.repeats or preset.get("repeats", 5 if cuda else 2),
        batch_size=args.batch_size,
        memory=not args.no_memory,
    )
