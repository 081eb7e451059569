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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .ensemble import highres_features
from .preprocess import normalize_batch
from .tiling import TileGrid, reflect_index
from .transforms import TransformSet

__all__ = [
    "BackboneRecipe",
    "BlockPlan",
    "SourceReader",
    "build_tasks",
    "load_block_halo",
    "run_block",
    "worker_backbone",
]

log = logging.getLogger(__name__)

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class BackboneRecipe:
    """How a worker builds its backbone: by name (cached per process) or from a factory."""

    name: str | None = None
    weights: str | None = None
    stride: int | None = None
    device: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    factory: Callable[[], Any] | None = field(default=None, compare=False)
    factory_token: str = ""  # identifies the factory across processes (set by the client)
    threads: int | None = None  # torch intra-op threads in each worker process

    def key(self) -> tuple:
        return (
            self.name,
            self.weights,
            self.stride,
            self.device,
            self.overrides,
            self.factory_token,
        )

    def build(self) -> Any:
        import warnings

        from .backbones import RandomWeightsWarning, load_backbone
        from .cluster import resolve_device

        device = resolve_device(self.device)  # "auto" resolves here, on the worker
        if self.factory is not None:
            bb = self.factory()
        else:
            with warnings.catch_warnings():
                # The client already warned loudly; workers would repeat it per process.
                warnings.simplefilter("ignore", RandomWeightsWarning)
                bb = load_backbone(
                    self.name,
                    self.weights,
                    self.stride,
                    device,
                    download=False,
                    **dict(self.overrides),
                )
        if isinstance(bb, torch.nn.Module):
            bb = bb.to(device).eval()
        return bb


def worker_backbone(recipe: BackboneRecipe | Any) -> Any:
    """The backbone for this process, built once per recipe (the only cache in the package)."""
    if not isinstance(recipe, BackboneRecipe):
        return recipe  # a backbone object shipped once to each worker
    key = recipe.key()
    with _MODELS_LOCK:
        if key not in _MODELS:
            log.info("building backbone %s on %s", recipe.name or recipe.factory, recipe.device)
            _MODELS[key] = recipe.build()
    if recipe.threads:
        # Per calling thread with OpenMP: the model may have been built in another thread.
        torch.set_num_threads(recipe.threads)
    return _MODELS[key]


@dataclass(frozen=True)
class BlockPlan:
    """Everything a block task needs, small enough to ship with every task."""

    grid: TileGrid
    block: int  # chunks per block side
    n_blocks: tuple[int, int]
    transforms: TransformSet
    value_range: tuple[float, float]
    channels: int  # feature channels C
    dtype: str
    batch_size: int | None
    store_path: str
    # Optional linear reduction applied to each window's features before blending (exact:
    # blending is linear with weights that sum to 1): out = components @ (f - mean).
    projection: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def blend_cells(self) -> int:
        return self.grid.blend_px // self.grid.out_stride

    @property
    def block_cells(self) -> int:
        return self.block * self.grid.chunk_cells

    def chunk_range(self, jb: int, axis: int) -> range:
        n = self.grid.n_windows[axis]
        return range(jb * self.block, min((jb + 1) * self.block, n))

    def halo_shapes(self) -> dict[str, tuple[int, ...]]:
        c, b, k = self.channels + 1, self.blend_cells, self.block_cells
        return {"bottom": (c, b, k), "right": (c, k, b), "corner": (c, b, b)}


class SourceReader:
    """Holds the source array so that Dask ships it as an object instead of computing it."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __getitem__(self, key):
        region = self.array[key]
        if hasattr(region, "compute"):
            region = region.compute(scheduler="sync")
        return np.asarray(region)


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
    """Raw windows ``(n, t, t, c)`` → ``(n, 3, t, t)`` on ``device``, as ``normalize`` does."""
    return normalize_batch(torch.from_numpy(np.ascontiguousarray(windows)).to(device), value_range)


def sample_window_features(
    source,
    plan: BlockPlan,
    backbone: Any,
    *,
    n_windows: int = 8,
    n_pixels: int = 50_000,
    seed: int = 0,
) -> np.ndarray:
    """Features of up to ``n_windows`` windows spread over the image → ``(n_pixels, C)`` sample."""
    g = plan.grid
    ny, nx = g.n_windows
    rng = np.random.default_rng(seed)
    all_ids = [(j, i) for j in range(ny) for i in range(nx)]
    picked = [
        all_ids[k]
        for k in sorted(rng.choice(len(all_ids), min(n_windows, len(all_ids)), replace=False))
    ]
    bb = worker_backbone(backbone)
    device = getattr(bb, "device", torch.device("cpu"))
    device = device if isinstance(device, torch.device) else torch.device("cpu")
    mc = g.margin_px // g.out_stride
    rows = []
    for window in picked:
        x = _normalise(_read_windows(source, plan, [window]), plan.value_range, device)
        f = highres_features(
            x, bb, plan.transforms, out_stride=g.out_stride, batch_size=plan.batch_size
        )[0]
        ys, xs = g.chunk_slices(*window)
        f = f[
            :, mc : mc + ys.stop - ys.start, mc : mc + xs.stop - xs.start
        ]  # the window's own cells
        rows.append(f.reshape(f.shape[0], -1).T.cpu().numpy())
    sample = np.concatenate(rows)
    keep = rng.choice(len(sample), min(n_pixels, len(sample)), replace=False)
    return sample[np.sort(keep)]


def _block_windows(plan: BlockPlan, jb: int, ib: int) -> list[tuple[int, int]]:
    return [(j, i) for j in plan.chunk_range(jb, 0) for i in plan.chunk_range(ib, 1)]


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
) -> dict[str, np.ndarray]:
    """Compute, blend and write block ``(jb, ib)``; return the strips it spills downstream."""
    import zarr

    g = plan.grid
    bb = worker_backbone(backbone)
    device = getattr(bb, "device", torch.device("cpu"))
    if not isinstance(device, torch.device):
        device = torch.device("cpu")
    cc, bc, kc = g.chunk_cells, plan.blend_cells, plan.block_cells
    mc = g.margin_px // g.out_stride
    acc = np.zeros((plan.channels + 1, kc + bc, kc + bc), np.float32)
    windows = _block_windows(plan, jb, ib)
    n_views = len(plan.transforms)
    per_pass = max(1, (plan.batch_size or n_views) // n_views)
    j0, i0 = jb * plan.block, ib * plan.block
    for start in range(0, len(windows), per_pass):
        group = windows[start : start + per_pass]
        x = _normalise(_read_windows(source, plan, group), plan.value_range, device)
        feats = highres_features(
            x, bb, plan.transforms, out_stride=g.out_stride, batch_size=plan.batch_size
        )
        feats = feats[:, :, mc : g.tile_cells - mc, mc : g.tile_cells - mc]
        if plan.projection is not None:
            mean, comps = (torch.as_tensor(a, device=feats.device) for a in plan.projection)
            feats = torch.einsum("kc,nchw->nkhw", comps, feats - mean[None, :, None, None])
        feats = feats.cpu().numpy()
        for (j, i), f in zip(group, feats, strict=True):
            wgt = g.weights(j, i)[mc : g.tile_cells - mc, mc : g.tile_cells - mc].astype(np.float32)
            r, c = (j - j0) * cc, (i - i0) * cc
            acc[: plan.channels, r : r + cc + bc, c : c + cc + bc] += f * wgt
            acc[plan.channels, r : r + cc + bc, c : c + cc + bc] += wgt
    if top is not None:
        acc[:, :bc, :kc] += top["bottom"]
    if left is not None:
        acc[:, :kc, :bc] += left["right"]
    if corner is not None:
        acc[:, :bc, :bc] += corner["corner"]

    group_ = zarr.open_group(plan.store_path, mode="r+", zarr_format=3)
    n_rows, n_cols = g.out_shape
    ys = (jb * kc, min((jb + 1) * kc, n_rows))
    xs = (ib * kc, min((ib + 1) * kc, n_cols))
    rows, cols = ys[1] - ys[0], xs[1] - xs[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = acc[: plan.channels, :rows, :cols] / acc[plan.channels, :rows, :cols]
    group_["features"][:, ys[0] : ys[1], xs[0] : xs[1]] = values.astype(plan.dtype)
    halo = {
        "bottom": acc[:, kc:, :kc],
        "right": acc[:, :kc, kc:],
        "corner": acc[:, kc:, kc:],
    }
    run = group_["_run"]
    last_row, last_col = jb == plan.n_blocks[0] - 1, ib == plan.n_blocks[1] - 1
    for name, strip in halo.items():
        needed = {
            "bottom": not last_row,
            "right": not last_col,
            "corner": not (last_row or last_col),
        }
        if needed[name]:
            run[f"halo_{name}"][jb, ib] = strip
    run["done"][jb, ib] = 1
    return halo


def load_block_halo(jb: int, ib: int, *, plan: BlockPlan) -> dict[str, np.ndarray]:
    """The strips of a block written by an earlier, interrupted run."""
    import zarr

    run = zarr.open_group(plan.store_path, mode="r", zarr_format=3)["_run"]
    return {name: run[f"halo_{name}"][jb, ib] for name in ("bottom", "right", "corner")}


def block_windows_count(plan: BlockPlan, jb: int, ib: int) -> int:
    return len(plan.chunk_range(jb, 0)) * len(plan.chunk_range(ib, 1))


def build_tasks(
    plan: BlockPlan, *, source: Any, backbone: Any, done: np.ndarray, run_id: str
) -> dict:
    """Delayed block tasks in wavefront order; finished blocks only reload their halos.

    Returns
    -------
    dict
        ``(jb, ib) ->`` the delayed halo strips of that block.
    """
    import dask

    tasks: dict[tuple[int, int], Any] = {}
    # Shipped once per worker as keys of their own, not pickled into every task.
    source = dask.delayed(source, pure=True, name=f"hrdv2-source-{run_id}")
    backbone = dask.delayed(backbone, pure=True, name=f"hrdv2-backbone-{run_id}")
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
                dask_key_name=key,
            )
    return tasks
