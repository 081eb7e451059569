"""The dock widget's session, without napari or Qt: one feature store and the analyses on it.

The widget (:mod:`._widget`) turns clicks and button presses into calls of :class:`Session`,
run in napari's thread workers; everything here is plain Python, tested without a viewer.

Geometry. napari places a layer's data pixel ``i`` at world ``translate + i * scale``; the
reader places output cell ``i`` of a store at ``scale = out_stride``, ``translate`` = its first
coordinate (:func:`~._reader.grid_placement`), in source pixels. :class:`Grid` maps world
positions (points clicked on any layer) to cells, and a Labels layer painted at any integer
subdivision of the cells (source pixels, or the cells themselves) onto the source pixels of
the grid, which :func:`~hrdv2_dask.analysis.segment.fit_segmenter` reduces to cells.

Every result is lazy (one dask task per chunk, as in :mod:`hrdv2_dask.analysis`). The widget
shows it twice: first the cells in view, subsampled to about the screen's pixel count
(:meth:`Grid.window`, :meth:`Session.view`), then the whole grid (:meth:`Session.full`): in
memory when computing it reads at most :data:`IN_MEMORY_BYTES` of features, else as lazy
pyramid levels (:class:`~._feature_levels.LazyLevel`) that compute only the chunks napari
shows, where and when it shows them, and keep them (the view at full resolution fills the
same kept chunks, so napari then reads them for free).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..analysis import (
    KMeansModel,
    KMeansOptions,
    PCAModel,
    PCAOptions,
    Segmenter,
    SegmentOptions,
    SimilarityOptions,
    fit_kmeans,
    fit_pca,
    fit_segmenter,
    load_model,
    pca_rgb,
    similarity,
)
from ..analysis._common import feature_data, run_attrs
from ..analysis._saved import saved
from ..analysis.collection import check_settings
from ..analysis.kmeans import write_clusters
from ..analysis.pca import write_pca
from ..analysis.segment import write_segmentation
from ..analysis.similarity import cosine_map, run_similarity
from ..errors import InputError
from ..io.collection import open_collection
from ..io.store import open_features
from . import _reader
from ._feature_levels import ChunkResults, LazyLevel, lazy_levels
from ._reader import VIEW_BYTES, grid_placement, path_kind

__all__ = ["IN_MEMORY_BYTES", "KINDS", "Grid", "Result", "Session", "one_line", "with_progress"]

#: The result kinds, in the widget's order.
KINDS = ("similarity", "segmentation", "pca", "clusters")
#: A whole result whose computation reads at most this many bytes of features is computed
#: into memory; a larger one is shown as lazy levels (computed where napari shows them).
IN_MEMORY_BYTES = VIEW_BYTES
_TOL = 1e-3  # of a pixel: placements that differ by less are the same


def one_line(err: BaseException) -> str:
    """The first line of an error's message (the error's name for an unexpected one).

    >>> one_line(InputError("bad point\\nmore"))
    'bad point'
    >>> one_line(KeyError("x"))
    "KeyError: 'x'"
    """
    from ..errors import Hrdv2Error

    text = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, Hrdv2Error):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass(frozen=True)
class Grid:
    """Where the cells of a feature grid lie in napari's world.

    Parameters
    ----------
    shape : (int, int)
        Cells ``(Y, X)``.
    scale, translate : (float, float)
        World size of a cell and world centre of cell ``(0, 0)`` (napari's layer placement).
    """

    shape: tuple[int, int]
    scale: tuple[float, float]
    translate: tuple[float, float]

    @classmethod
    def of(cls, features: xr.DataArray) -> Grid:
        """The grid as the reader places it (source pixels)."""
        scale, translate = grid_placement(
            features["y"].values, features["x"].values, features.attrs.get("out_stride")
        )
        return cls((features.sizes["y"], features.sizes["x"]), scale, translate)

    def cells(self, world: Any) -> np.ndarray:
        """The ``(n, 2)`` integer cells under world positions ``(n, 2)`` (last two axes).

        Raises
        ------
        InputError
            A position outside the grid.

        Examples
        --------
        >>> Grid((10, 12), (4.0, 4.0), (1.5, 1.5)).cells([[9, 13], [0, 0]]).tolist()
        [[2, 3], [0, 0]]
        """
        pos = np.atleast_2d(np.asarray(world, dtype=np.float64))[:, -2:]
        if pos.size == 0:
            raise InputError(
                "The points layer is empty; click query points on the image first (add "
                "points mode, then click)."
            )
        scale, translate = np.asarray(self.scale), np.asarray(self.translate)
        cells = np.floor((pos - translate) / scale + 0.5).astype(np.int64)
        bad = ((cells < 0) | (cells >= np.asarray(self.shape))).any(axis=1)
        if bad.any():
            y, x = pos[np.argmax(bad)]
            raise InputError(
                f"Point (y={y:.1f}, x={x:.1f}) is outside the features ({self.shape[0]}x"
                f"{self.shape[1]} cells of {scale[0]:g} px); move or delete it."
            )
        return cells

    def window(
        self, lo: Sequence[float], hi: Sequence[float], screen: Sequence[int]
    ) -> tuple[slice, slice] | None:
        """The cells in the world box ``[lo, hi]`` (the view), every ``step``-th one so that
        about ``screen`` ``(h, w)`` pixels remain; None when the view shows no cell.

        Examples
        --------
        >>> g = Grid((1000, 800), (4.0, 4.0), (1.5, 1.5))
        >>> g.window((0, 0), (4000, 3200), (500, 400))  # all of it, every 2nd cell
        (slice(0, 1000, 2), slice(0, 800, 2))
        >>> g.window((400, 400), (500, 440), (500, 400))  # zoomed in: every cell
        (slice(100, 126, 1), slice(100, 111, 1))
        """
        out, n = [], []
        for a in range(2):
            s, t = self.scale[a], self.translate[a]
            i0 = max(0, math.floor((lo[a] - t) / s + 0.5))
            i1 = min(self.shape[a], math.floor((hi[a] - t) / s + 0.5) + 1)
            if i1 <= i0:
                return None
            out.append((i0, i1))
            # cells per screen pixel from the view's extent (its cell count has one more)
            n.append((hi[a] - lo[a]) / s / max(1, int(screen[a])))
        step = max(1, math.ceil(max(n) - 1e-9))
        return slice(*out[0], step), slice(*out[1], step)

    def placement(
        self, rows: slice, cols: slice
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``(scale, translate)`` of the cells ``rows, cols`` (slices with a step).

        >>> Grid((10, 10), (4.0, 4.0), (1.5, 1.5)).placement(slice(2, 8, 3), slice(0, 10, 1))
        ((12.0, 4.0), (9.5, 1.5))
        """
        scale, translate = [], []
        for a, sl in enumerate((rows, cols)):
            scale.append(self.scale[a] * (sl.step or 1))
            translate.append(self.translate[a] + (sl.start or 0) * self.scale[a])
        return (scale[0], scale[1]), (translate[0], translate[1])

    def scribbles(
        self, labels: np.ndarray, scale: Sequence[float], translate: Sequence[float]
    ) -> tuple[slice, slice, np.ndarray]:
        """The labelled part of a Labels layer: ``(rows, cols, labels)`` with the cells that
        hold a label and the layer's pixels over them (``sub`` pixels per cell and axis).

        The layer may be painted at the cells' resolution or at any integer subdivision of a
        cell (the source pixels: ``out_stride`` per cell), on the grid's pixel lattice; it
        may cover more or less than the grid. The crop keeps fitting fast on a huge store.

        Raises
        ------
        InputError
            A layer not on the grid's lattice, or without two classes on the grid.

        Examples
        --------
        >>> g = Grid((4, 5), (2.0, 2.0), (0.5, 0.5))
        >>> lab = np.zeros((8, 10), np.uint8); lab[2, 3] = 1; lab[5, 9] = 2
        >>> rows, cols, crop = g.scribbles(lab, (1, 1), (0, 0))
        >>> rows, cols, crop.shape
        (slice(1, 3, None), slice(1, 5, None), (4, 8))
        """
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise InputError(
                f"The scribbles layer is {labels.ndim}-D; paint on a 2-D Labels layer (the "
                "widget's New scribbles button makes one)."
            )
        subs, offsets = [], []
        for a in range(2):
            sub = self.scale[a] / float(scale[a])
            # labels pixel where cell 0 begins (napari pixels are centred on their coordinate)
            off = ((self.translate[a] - self.scale[a] / 2) - (translate[a] - scale[a] / 2)) / float(
                scale[a]
            )
            if abs(sub - round(sub)) > _TOL or round(sub) < 1 or abs(off - round(off)) > _TOL:
                raise InputError(
                    f"The scribbles layer (scale {float(scale[a]):g}, translate "
                    f"{float(translate[a]):g}) is not on the features' pixel grid (cells of "
                    f"{self.scale[a]:g} from {self.translate[a] - self.scale[a] / 2:g}); make "
                    "it with the widget's New scribbles button."
                )
            subs.append(round(sub))
            offsets.append(round(off))
        sy, sx = subs
        shape = (self.shape[0] * sy, self.shape[1] * sx)
        # the layer's pixels over the grid, as grid pixels (zeros where the layer ends)
        src = [
            slice(max(0, o), min(n + o, labels.shape[a]))
            for a, (o, n) in enumerate(zip(offsets, shape, strict=True))
        ]
        if any(s.stop <= s.start for s in src):
            raise InputError(
                "The scribbles layer does not overlap the features; paint on the image."
            )
        part = labels[src[0], src[1]]
        ys, xs = np.nonzero(part)
        if not len(ys):
            raise InputError(
                "The scribbles layer has no label on the image; paint at least two classes "
                "(labels 1 and 2) over it."
            )
        ys = ys + (src[0].start - offsets[0])
        xs = xs + (src[1].start - offsets[1])
        rows = slice(int(ys.min()) // sy, int(ys.max()) // sy + 1)
        cols = slice(int(xs.min()) // sx, int(xs.max()) // sx + 1)
        crop = np.zeros(((rows.stop - rows.start) * sy, (cols.stop - cols.start) * sx), part.dtype)
        y0, x0 = rows.start * sy + offsets[0], cols.start * sx + offsets[1]
        a0, b0 = max(y0, 0), max(x0, 0)
        a1 = min(y0 + crop.shape[0], labels.shape[0])
        b1 = min(x0 + crop.shape[1], labels.shape[1])
        crop[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = labels[a0:a1, b0:b1]
        if np.issubdtype(crop.dtype, np.signedinteger):
            crop = np.clip(crop, 0, None)
        return rows, cols, crop

    def scribbles_layer(
        self,
        stride: int,
        max_pixels: int = 64_000_000,
        around: tuple[slice, slice] | None = None,
    ) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
        """``(shape, scale, translate)`` of a new empty scribbles layer: on the source pixels
        (``stride`` per cell) when there are at most ``max_pixels`` of them, else on the cells.

        A grid of more than ``max_pixels`` cells (a gigapixel store: 625 MB of zeros for
        napari at 25,000² cells) gets a layer over the cells ``around`` only (the view; None:
        the middle), grown by its own size on each side, up to ``max_pixels``, on the source
        pixels where they fit: :meth:`scribbles` takes a layer of any extent on the lattice.

        >>> Grid((10, 12), (4.0, 4.0), (1.5, 1.5)).scribbles_layer(4)
        ((40, 48), (1.0, 1.0), (0.0, 0.0))
        >>> g = Grid((1000, 1000), (4.0, 4.0), (1.5, 1.5))
        >>> g.scribbles_layer(4, max_pixels=10_000, around=(slice(500, 510), slice(0, 20)))
        ((30, 40), (4.0, 4.0), (1961.5, 1.5))
        >>> g.scribbles_layer(4, max_pixels=10_000, around=(slice(0, 1000), slice(0, 1000)))[0]
        (100, 100)
        """
        rows, cols = slice(0, self.shape[0]), slice(0, self.shape[1])
        if self.shape[0] * self.shape[1] > max_pixels:
            rows, cols = self._around(around, max_pixels)
        n = (rows.stop - rows.start, cols.stop - cols.start)
        sub = max(1, int(stride))
        if n[0] * n[1] * sub * sub > max_pixels:
            sub = 1
        shape = (n[0] * sub, n[1] * sub)
        px = (self.scale[0] / sub, self.scale[1] / sub)
        first = (rows.start, cols.start)
        translate = tuple(
            self.translate[a] + (first[a] - 0.5) * self.scale[a] + px[a] / 2 for a in range(2)
        )
        return shape, px, (translate[0], translate[1])

    def _around(self, around: tuple[slice, slice] | None, max_pixels: int) -> tuple[slice, slice]:
        """The cells ``around`` grown by their size on each side, at most ``max_pixels``."""
        if around is None:
            side = max(1, math.isqrt(max_pixels) // 3)
            around = tuple(
                slice(max(0, (n - side) // 2), (n - side) // 2 + side) for n in self.shape
            )
        grown = []
        for sl, n in zip(around, self.shape, strict=True):
            lo, hi = int(sl.start or 0), int(sl.stop if sl.stop is not None else n)
            grown.append([max(0, lo - (hi - lo)), min(n, hi + (hi - lo))])
        area = (grown[0][1] - grown[0][0]) * (grown[1][1] - grown[1][0])
        if area > max_pixels:  # both axes shrunk alike, about their middle
            f = math.sqrt(max_pixels / area)
            for g in grown:
                keep = max(1, int((g[1] - g[0]) * f))
                g[0] = (g[0] + g[1] - keep) // 2
                g[1] = g[0] + keep
        return slice(*grown[0]), slice(*grown[1])


@dataclass
class Result:
    """One analysis result of a session: a lazy ``(y, x)`` (or ``(y, x, rgb)``) array.

    ``apply`` is the per-cell function that made ``data`` from the features (a view runs
    it on the cells shown only, a lazy level on each chunk's own features), ``model`` the
    fitted model (None for similarity), ``info`` what the fit reports (query cells, training
    accuracy...), ``chunks`` the kept chunks of ``data`` once it is shown lazily
    (:meth:`Session.full`).
    """

    kind: str
    data: xr.DataArray
    apply: Callable[[xr.DataArray], xr.DataArray] = field(repr=False)
    model: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    chunks: ChunkResults | None = field(default=None, repr=False)

    @property
    def labels(self) -> bool:
        """Whether it is a label image (a napari Labels layer)."""
        return self.kind in ("segmentation", "clusters")


class Session:
    """One feature store opened by the widget, and the results computed on it.

    Parameters
    ----------
    path : str or os.PathLike
        A feature store, or a member of a collection (``collection.zarr/KEY``).
    grid : Grid, optional
        Where napari shows its cells (default: the reader's placement).

    Raises
    ------
    StoreError, InputError
        Not a feature store (a collection names its members in the message).
    """

    def __init__(self, path: str | os.PathLike, grid: Grid | None = None) -> None:
        self.path = Path(path)
        if path_kind(self.path) == "collection":
            keys = list(open_collection(self.path).children)
            raise InputError(
                f"{str(self.path)!r} is a collection of {len(keys)} members; pick one: "
                f"{str(self.path / (keys[0] if keys else 'KEY'))!r} (its layers carry that path)."
            )
        self.features = open_features(self.path)
        self.grid = grid or Grid.of(self.features)
        if self.grid.shape != (self.features.sizes["y"], self.features.sizes["x"]):
            raise InputError(
                f"The layer's grid {self.grid.shape} is not the store's "
                f"{(self.features.sizes['y'], self.features.sizes['x'])}; reopen the store."
            )
        self.results: dict[str, Result] = {}

    @property
    def stride(self) -> int:
        """The store's ``out_stride``: source pixels per cell."""
        return int(self.features.attrs.get("out_stride", 1))

    def scribbles_layer(
        self, around: tuple[slice, slice] | None = None
    ) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
        """``(shape, scale, translate)`` of an empty scribbles layer (around the cells in
        view on a gigapixel store; see :meth:`Grid.scribbles_layer`)."""
        return self.grid.scribbles_layer(self.stride, around=around)

    @property
    def name(self) -> str:
        """The store's name, as the reader names its layers."""
        return self.path.name

    # --- analyses (lazy; fitting reads a bounded sample) ----------------------------------

    def similarity(self, world: Any) -> Result:
        """Cosine similarity to the mean feature of the cells under world points ``(n, 2)``."""
        cells = self.grid.cells(world)
        sim = similarity(self.features, points=cells)  # checks the points; its query is lazy
        ys, xs = cells[:, 0], cells[:, 1]
        _, data = feature_data(self.features)
        # the query now (the chunks of the points): a lazy map would read them per compute
        query = np.asarray(data.vindex[:, ys, xs].astype(np.float32).mean(axis=0).compute())

        def apply(features: xr.DataArray) -> xr.DataArray:
            features, fdata = feature_data(features)
            q = da.from_array(query, chunks=-1)
            return cosine_map(features, fdata, q, dict(sim.attrs), np.dtype(np.float32))

        info = {"points": cells.tolist()}
        return self._keep(Result("similarity", apply(self.features), apply, info=info))

    def segment(
        self,
        labels: np.ndarray,
        scale: Sequence[float] = (1.0, 1.0),
        translate: Sequence[float] = (0.0, 0.0),
        *,
        method: str = SegmentOptions.method,
        seed: int = SegmentOptions.seed,
    ) -> Result:
        """Train a segmenter on scribbles (a Labels layer's data and placement), lazily
        predict every cell. The fit reads only the features under the scribbles."""
        rows, cols, crop = self.grid.scribbles(labels, scale, translate)
        sub = crop.shape[0] // (rows.stop - rows.start)
        stride = self.stride
        if sub not in (1, stride):
            raise InputError(
                f"The scribbles layer has {sub} pixels per feature cell; paint at the source "
                f"image's pixels ({stride} per cell) or on the cells (New scribbles makes one)."
            )
        part = self.features.isel(y=rows, x=cols)
        model, report = fit_segmenter(part, crop, method=method, seed=seed)
        return self._model_result("segmentation", model, report)

    def pca(self, *, n_samples: int = PCAOptions.samples, seed: int = PCAOptions.seed) -> Result:
        """A 3-component PCA fitted on a sample; its RGB picture (``pca_rgb``)."""
        model = fit_pca(self.features, components=3, n_samples=n_samples, seed=seed)
        return self._model_result("pca", model, {})

    def clusters(
        self,
        k: int = KMeansOptions.k,
        *,
        n_samples: int = KMeansOptions.samples,
        seed: int = KMeansOptions.seed,
    ) -> Result:
        """k-means fitted on a sample; the cluster of every cell."""
        model = fit_kmeans(self.features, k=k, n_samples=n_samples, seed=seed)
        return self._model_result("clusters", model, {"k": k})

    def apply(self, path: str | os.PathLike) -> Result:
        """A saved model (``--save-model``, :meth:`save_model`) applied to this store."""
        model = load_model(path)
        check_settings(model.settings, self.features, f"The model {str(path)!r}")
        info = {"model": str(path)}
        if isinstance(model, Segmenter):
            return self._model_result("segmentation", model, info)
        if isinstance(model, KMeansModel):
            return self._model_result("clusters", model, info)
        assert isinstance(model, PCAModel)
        if model.n_components < 3:
            raise InputError(
                f"The PCA model {str(path)!r} has {model.n_components} components; the picture "
                "needs 3: fit it with --components 3."
            )
        return self._model_result("pca", model, info)

    def _model_result(self, kind: str, model: Any, info: dict[str, Any]) -> Result:
        def apply(features: xr.DataArray) -> xr.DataArray:
            return pca_rgb(features, model) if kind == "pca" else model.predict(features)

        return self._keep(Result(kind, apply(self.features), apply, model, info))

    def _keep(self, result: Result) -> Result:
        self.results[result.kind] = result
        return result

    def result(self, kind: str) -> Result:
        """The last result of ``kind``, or an InputError saying which button makes it."""
        if kind not in self.results:
            button = {"segmentation": "Train + segment", "clusters": "Clusters"}.get(
                kind, kind.capitalize()
            )
            raise InputError(f"No {kind} yet; press {button} first.")
        return self.results[kind]

    # --- showing a result -----------------------------------------------------------------

    def view(
        self, result: Result, window: tuple[slice, slice]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The cells of ``window`` (from :meth:`Grid.window`), computed, and their placement.

        At full resolution (step 1) of a lazily shown result, its kept chunks (computed where
        missing: napari then draws them without computing); else the result's function runs
        on those cells only (every ``step``-th); the chunks they lie in are read.
        """
        rows, cols = window
        if result.chunks is not None and rows.step == cols.step == 1:
            data = result.chunks.region(rows.start, rows.stop, cols.start, cols.stop)
            data = data[..., :3] if result.kind == "pca" else data  # without full()'s alpha
        else:
            data = np.asarray(result.apply(self.features.isel(y=rows, x=cols)).values)
        scale, translate = self.grid.placement(rows, cols)
        return data, {"scale": scale, "translate": translate}

    @property
    def cell_bytes(self) -> int:
        """Bytes of features read per cell by any result."""
        return int(self.features.sizes["feature"] * self.features.dtype.itemsize)

    def lazy(self, result: Result) -> bool:
        """Whether :meth:`full` shows ``result`` as lazy levels (its whole computation would
        read more than :data:`IN_MEMORY_BYTES`)."""
        return self.grid.shape[0] * self.grid.shape[1] * self.cell_bytes > IN_MEMORY_BYTES

    def full(self, result: Result) -> tuple[np.ndarray | list[LazyLevel], dict[str, Any]]:
        """Every cell of ``result`` and its placement: computed into memory, or (when
        :meth:`lazy`) pyramid levels computing only the chunks napari shows.

        Lazy levels: levels 2x smaller down to the reader's ``PLACEHOLDER_PX`` (at least two:
        napari reads a one-level image whole), placeholders (transparent: the view shows
        through) from the first whose screen would read more than the reader's
        ``VIEW_BYTES``, the coarsest always (napari reads it whole for its thumbnail); labels
        take every other cell, images the 2x2 mean; the PCA picture gets an alpha channel
        (0 in placeholders). Their chunks are kept (:attr:`Result.chunks`, shared with
        :meth:`view`).
        """
        scale, translate = self.grid.placement(slice(0, None, 1), slice(0, None, 1))
        place = {"scale": scale, "translate": translate}
        if not self.lazy(result):
            return np.asarray(result.data.values), place
        if result.chunks is None:
            result.chunks = self._chunk_results(result)
        side = max(self.grid.shape)
        n_levels = max(
            _reader.levels_above(side, _reader.MULTISCALE_PX),
            _reader.levels_above(side, _reader.PLACEHOLDER_PX),
            2,
        )
        # napari computes the coarsest level whole on the GUI thread (its thumbnail) when
        # the layer is made: a placeholder
        first = min(_reader.placeholder_from(n_levels, self.cell_bytes), n_levels - 1)
        levels = lazy_levels(result.chunks, n_levels, labels=result.labels, first_placeholder=first)
        return levels, place

    def _chunk_results(self, result: Result) -> ChunkResults:
        """``result``'s chunks, each computed from its own features (the PCA picture with an
        alpha channel: 255, 0 in placeholders)."""
        features, rgba, apply = self.features, result.kind == "pca", result.apply

        def make(rows: slice, cols: slice) -> da.Array:
            data = apply(features.isel(y=rows, x=cols)).data
            if rgba:
                data = da.concatenate([data, da.full_like(data[..., :1], 255)], axis=2)
            return data

        shape = (*self.grid.shape, *result.data.shape[2:])
        if rgba:
            shape = (*shape[:2], 4)
        return ChunkResults(make, shape, result.data.dtype, self.features.data.chunks[1:])

    # --- saving and exporting -------------------------------------------------------------

    def save_model(self, kind: str, path: str | os.PathLike) -> Path:
        """Save the model of the last ``kind`` result with the CLI's ``--save-model`` files."""
        result = self.result(kind)
        if result.model is None:
            raise InputError(
                f"A {kind} map has no model to save; save a segmentation, PCA or clusters."
            )
        return Path(saved(result.model, path)["model"])

    def export(self, kind: str, out: str | os.PathLike) -> dict[str, Any]:
        """Write the full-resolution ``kind`` result under ``out`` with the CLI's writers
        (the files ``hrdv2 similarity|segment|pca|cluster`` write); return their summary."""
        result = self.result(kind)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if kind == "similarity":
            options = SimilarityOptions(points=tuple(map(tuple, result.info["points"])))
            return run_similarity(options, self.features, out)
        if kind == "segmentation":
            report = {k: v for k, v in result.info.items() if k != "model"}
            attrs = {"analysis": "segment", "labels": "napari scribbles", **report}
            return write_segmentation(result.model, self.features, out, attrs=attrs)
        if kind == "pca":
            attrs = run_attrs(PCAOptions(components=3))
            return write_pca(result.model, self.features, out, attrs=attrs)
        attrs = run_attrs(KMeansOptions(k=result.model.k))
        return write_clusters(result.model, self.features, out, attrs=attrs)


def with_progress(
    fn: Callable[[], Any], *, every_s: float = 0.1
) -> Iterator[tuple[int, int] | tuple[str, Any]]:
    """Run ``fn()`` in a thread, yielding ``(tasks done, tasks known)`` of its dask computes
    while it runs, then ``("done", its return value)``; its error is raised here.

    The counts come from a dask callback, so they move with the local schedulers (the
    widget's); under a distributed client they stay at 0 until the end.
    """
    from dask.callbacks import Callback

    counts = {"done": 0, "total": 0}
    lock = threading.Lock()

    class _Count(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            with lock:
                counts["total"] += len(state["ready"]) + len(state["waiting"])

        def _posttask(self, *args: Any) -> None:
            with lock:
                counts["done"] += 1

    box: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            with _Count():
                box.put(("done", fn()))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            box.put(("error", err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while True:
        try:
            what, value = box.get(timeout=every_s)
        except queue.Empty:
            with lock:
                yield counts["done"], max(counts["total"], 1)
            continue
        thread.join()
        if what == "error":
            raise value
        with lock:
            yield counts["total"], max(counts["total"], 1)
        yield "done", value
        return
