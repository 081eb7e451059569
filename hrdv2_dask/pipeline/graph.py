"""The Dask graph of an extraction run: one task per block of windows, halos passed downstream.

Window ``(j, i)`` is blended with weights that are non-zero from the first pixel of output chunk
``(j, i)`` and spill only into the first ``blend`` cells of the chunks below and to the right
(see :mod:`hrdv2_dask.tiling`). A task owns a block of ``K x K`` chunks: it computes the block's
windows once, adds the strips that its upper, left and upper-left neighbours spilled into it,
divides by the summed weights, writes its chunks (each chunk has exactly one writer) and passes
its own spill on. The graph is a wavefront: each window is computed once, nothing is
recomputed at block borders, and only thin strips travel between tasks. Strips are also saved in
the store so that an interrupted run resumes with only the missing blocks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..ensemble import highres_features, position_bias
from ..io.readers import read_region
from ..io.store import BlockWriter
from ..preprocess import normalize_batch
from ..tiling import reflect_index
from .plan import BlockPlan
from .workers import progress_topic, report_progress, worker_backbone

__all__ = [
    "BlockPlan",  # defined in plan
    "SourceReader",
    "bias_sums",
    "build_tasks",
    "feature_sample",
    "load_block_halo",
    "pick_windows",
    "run_block",
    "shipped",
]

log = logging.getLogger(__name__)


class SourceReader:
    """Holds the source array so that Dask ships it as an object instead of computing it.

    A region that cannot be read raises :class:`~hrdv2_dask.errors.SourceReadError` naming the
    source (``name``) and the rows and columns.
    """

    def __init__(self, array: Any, *, name: str = "the image") -> None:
        self.array = array
        self.name = name

    def __getitem__(self, key):
        return read_region(self.array, key, name=self.name, fix=_SOURCE_FIX)


_SOURCE_FIX = (
    "The file is damaged there (or changed during the run): repair or replace it, or mask that "
    "region out, then rerun the same command to resume"
)


def _read_windows(source, plan: BlockPlan, windows: list[tuple[int, int]]) -> np.ndarray:
    """Reflect-padded windows ``(n, tile, tile, c)`` read from one in-bounds slab of ``source``."""
    g = plan.grid
    h, w = g.image_shape
    rows = [reflect_index(np.arange(g.tile_px) + g.window_origin(j, i)[0], h) for j, i in windows]
    cols = [reflect_index(np.arange(g.tile_px) + g.window_origin(j, i)[1], w) for j, i in windows]
    r0 = min(int(r.min()) for r in rows)
    r1 = max(int(r.max()) for r in rows) + 1
    c0 = min(int(c.min()) for c in cols)
    c1 = max(int(c.max()) for c in cols) + 1
    slab = source[r0:r1, c0:c1]
    return np.stack([slab[np.ix_(r - r0, c - c0)] for r, c in zip(rows, cols, strict=True)])


def _normalise(windows: np.ndarray, value_range: tuple[float, float], device) -> torch.Tensor:
    """Raw windows ``(n, t, t, c)`` → ``(n, 3, t, t)`` on ``device``, as ``normalize`` does.

    The raw dtype (uint8 for most images) crosses to the GPU, from pinned memory, and is
    normalised there.
    """
    x = torch.from_numpy(np.ascontiguousarray(windows))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return normalize_batch(x, value_range)


def _device(backbone) -> torch.device:
    device = getattr(backbone, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def pick_windows(plan: BlockPlan, n_windows: int, *, seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``n_windows`` computed windows spread over the image, picked with ``seed``.

    The windows that the estimates (positional artefact, PCA) are made from: the same for a
    given plan and seed, whatever the cluster.
    """
    ny, nx = plan.grid.n_windows
    ids = [(j, i) for j in range(ny) for i in range(nx) if plan.computes(j, i)]
    rng = np.random.default_rng(seed)
    return [ids[k] for k in sorted(rng.choice(len(ids), min(n_windows, len(ids)), replace=False))]


def bias_sums(
    windows: list[tuple[int, int]], *, plan: BlockPlan, source, backbone: Any
) -> list[np.ndarray]:
    """Task: the sum over ``windows`` of :func:`hrdv2_dask.position_bias`, per transform.

    ``position_bias`` is a mean minus its spatial mean, linear in the windows, so the sums of
    several tasks divided by their number of windows give the estimate over all of them.
    """
    bb = worker_backbone(backbone)
    x = _normalise(_read_windows(source, plan, windows), plan.value_range, _device(bb))
    part = position_bias(
        x, bb, plan.transforms, batch_size=plan.batch_size, precision=plan.precision
    )
    return [(p * len(windows)).cpu().numpy() for p in part]


def feature_sample(
    window: tuple[int, int],
    *,
    plan: BlockPlan,
    source,
    backbone: Any,
    token_bias: list[np.ndarray] | None = None,
    n_pixels: int,
    seed: int = 0,
) -> np.ndarray:
    """Task: features ``(n, C)`` of up to ``n_pixels`` cells of ``window`` that it owns.

    The cells are picked with a generator seeded by ``seed`` and the window's index, so a
    sample does not depend on which worker computes it.
    """
    g = plan.grid
    bb = worker_backbone(backbone)
    x = _normalise(_read_windows(source, plan, [window]), plan.value_range, _device(bb))
    f = highres_features(
        x,
        bb,
        plan.transforms,
        out_stride=g.out_stride,
        batch_size=plan.batch_size,
        token_bias=token_bias,
        precision=plan.precision,
    )[0]
    mc = g.margin_px // g.out_stride
    ys, xs = g.chunk_slices(*window)
    f = f[:, mc : mc + ys.stop - ys.start, mc : mc + xs.stop - xs.start]  # its own cells
    f = f.reshape(f.shape[0], -1)
    rng = np.random.default_rng([seed, *window])
    keep = np.sort(rng.choice(f.shape[1], min(n_pixels, f.shape[1]), replace=False))
    return f[:, torch.from_numpy(keep).to(f.device)].T.cpu().numpy()


def _block_windows(plan: BlockPlan, jb: int, ib: int) -> list[tuple[int, int]]:
    return [
        (j, i)
        for j in plan.chunk_range(jb, 0)
        for i in plan.chunk_range(ib, 1)
        if plan.computes(j, i)
    ]


_READERS = threading.local()


def _reader() -> ThreadPoolExecutor:
    """The reading thread of the calling task thread, started once: a block of a small image
    (a collection's member) is too short a task to pay for starting a thread each time."""
    pool = getattr(_READERS, "pool", None)
    if pool is None:
        pool = _READERS.pool = ThreadPoolExecutor(1, thread_name_prefix="hrdv2-read")
    return pool


def _prefetched(source, plan: BlockPlan, groups: list) -> Iterator[np.ndarray]:
    """Raw windows of each group, the next group read in a thread while this one computes."""
    if not groups:
        return
    pool = _reader()
    pending = pool.submit(_read_windows, source, plan, groups[0])
    try:
        for k in range(len(groups)):
            raw = pending.result()
            if k + 1 < len(groups):
                pending = pool.submit(_read_windows, source, plan, groups[k + 1])
            yield raw
    finally:
        pending.cancel()  # a task that failed mid-block leaves no read queued


def run_block(
    jb: int,
    ib: int,
    top: dict | None,
    left: dict | None,
    corner: dict | None,
    *,
    plan: BlockPlan,
    source: Any,
    backbone: Any,
    token_bias: list[np.ndarray] | None = None,
    topic: str | None = None,
    writer: BlockWriter | None = None,
) -> dict[str, np.ndarray]:
    """Compute, blend and write block ``(jb, ib)``; return the strips it spills downstream
    (those that a block below or to the right receives: none for the bottom-right block).

    ``writer``: the store's :class:`~hrdv2_dask.io.store.BlockWriter` where one task writes
    several blocks of it (default: one for this block).

    Windows are blended on the backbone's device; only the finished block (in the stored dtype)
    and the thin strips cross back to the host. Each group of windows computed is reported on
    the worker-event ``topic`` (live progress).
    """
    g = plan.grid
    bb = worker_backbone(backbone)
    device = _device(bb)
    cc, bc, kc = g.chunk_cells, plan.blend_cells, plan.block_cells
    mc = g.margin_px // g.out_stride
    inner = slice(mc, g.tile_cells - mc)
    acc = torch.zeros((plan.channels + 1, kc + bc, kc + bc), dtype=torch.float32, device=device)
    windows = _block_windows(plan, jb, ib)
    n_views = len(plan.transforms)
    per_pass = max(1, (plan.batch_size or n_views) // n_views)
    j0, i0 = jb * plan.block, ib * plan.block
    groups = [windows[k : k + per_pass] for k in range(0, len(windows), per_pass)]
    # window (j, i) weighs its cells with wy[j] (x) wx[i]: the 1-D profiles once per block, in
    # float64 as TileGrid.weights computes them
    wy, wx = (
        {
            k: torch.from_numpy(g.weights_1d(axis, k)[inner]).to(device)
            for k in {w[axis] for w in windows}
        }
        for axis in (0, 1)
    )
    for group, raw in zip(groups, _prefetched(source, plan, groups), strict=True):
        x = _normalise(raw, plan.value_range, device)
        feats = highres_features(
            x,
            bb,
            plan.transforms,
            out_stride=g.out_stride,
            batch_size=plan.batch_size,
            head=plan.head,
            precision=plan.precision,
            token_bias=token_bias,
        )
        for (j, i), f in zip(group, feats[:, :, inner, inner], strict=True):
            wgt = torch.outer(wy[j], wx[i]).float()
            r, c = (j - j0) * cc, (i - i0) * cc
            acc[: plan.channels, r : r + cc + bc, c : c + cc + bc].addcmul_(f, wgt)
            acc[plan.channels, r : r + cc + bc, c : c + cc + bc].add_(wgt)
        del feats
        report_progress(topic, len(group))
    for strip, region in ((top, "bottom"), (left, "right"), (corner, "corner")):
        if strip is not None:
            part = torch.from_numpy(strip[region]).to(device)
            acc[:, : part.shape[1], : part.shape[2]].add_(part)

    n_rows, n_cols = g.out_shape
    ys = (jb * kc, min((jb + 1) * kc, n_rows))
    xs = (ib * kc, min((ib + 1) * kc, n_cols))
    rows, cols = ys[1] - ys[0], xs[1] - xs[0]
    weight = acc[plan.channels, :rows, :cols]
    # 0 / 0 = NaN where no computed window reaches (skipped background): the fill value
    values = (acc[: plan.channels, :rows, :cols] / weight).to(getattr(torch, plan.dtype))
    # copies: a view would keep the whole accumulator alive while Dask holds the strips
    halo = {
        "bottom": acc[:, kc:, :kc].cpu().numpy().copy(),
        "right": acc[:, :kc, kc:].cpu().numpy().copy(),
        "corner": acc[:, kc:, kc:].cpu().numpy().copy(),
    }
    last_row, last_col = jb == plan.n_blocks[0] - 1, ib == plan.n_blocks[1] - 1
    needed = {"bottom": not last_row, "right": not last_col, "corner": not (last_row or last_col)}
    halo = {k: v for k, v in halo.items() if needed[k]}  # what some block receives
    (writer or BlockWriter(plan.store_path)).write_block(
        (jb, ib),
        values.cpu().numpy(),
        (weight > 0).cpu().numpy(),
        origin=(ys[0], xs[0]),
        chunk=cc,
        halo=halo,
    )
    return halo


def load_block_halo(jb: int, ib: int, *, plan: BlockPlan) -> dict[str, np.ndarray]:
    """The strips of a block written by an earlier, interrupted run."""
    return BlockWriter(plan.store_path).saved_halo((jb, ib))


def block_windows_count(plan: BlockPlan, jb: int, ib: int) -> int:
    return len(_block_windows(plan, jb, ib))


def shipped(value: Any, what: str, run_id: str) -> Any:
    """``value`` as a Dask key of its own, so that it travels once per worker instead of
    being pickled into every task (already shipped values and ``None`` pass through)."""
    import dask

    if value is None:
        return None
    return dask.delayed(value, pure=True, name=f"hrdv2-{what}-{run_id}")


def build_tasks(
    plan: BlockPlan,
    *,
    source: Any,
    backbone: Any,
    done: np.ndarray,
    run_id: str,
    token_bias: list[np.ndarray] | None = None,
    ship_source: bool = True,
) -> dict:
    """Delayed block tasks in wavefront order; finished blocks only reload their halos.

    ``source`` travels as a Dask key of its own, once per worker, unless ``ship_source`` is
    false (for a graph of one task: it then travels inside that task).

    Returns
    -------
    dict
        ``(jb, ib) ->`` the delayed halo strips of that block.
    """
    import dask

    tasks: dict[tuple[int, int], Any] = {}
    if ship_source:
        source = shipped(source, "source", run_id)
    backbone = shipped(backbone, "backbone", run_id)
    token_bias = shipped(token_bias, "bias", run_id)
    run = dask.delayed(run_block, pure=False)
    load = dask.delayed(load_block_halo, pure=False)
    for jb in range(plan.n_blocks[0]):
        for ib in range(plan.n_blocks[1]):
            key = f"hrdv2-block-{jb}-{ib}-{run_id}"
            if done[jb, ib]:
                tasks[jb, ib] = load(jb, ib, plan=plan, dask_key_name=f"{key}-resumed")
                continue
            tasks[jb, ib] = run(
                jb,
                ib,
                tasks.get((jb - 1, ib)),
                tasks.get((jb, ib - 1)),
                tasks.get((jb - 1, ib - 1)),
                plan=plan,
                source=source,
                backbone=backbone,
                token_bias=token_bias,
                topic=progress_topic(run_id),
                dask_key_name=key,
            )
    return tasks
