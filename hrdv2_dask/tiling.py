"""Window grid of an extraction run: where windows sit, how they are blended, how they are read.

A gigapixel image ``(H, W)`` is cut into overlapping square windows of ``tile_px`` pixels. The
backbone computes features for each window at ``out_stride`` pixels per output cell, and the
windows are blended into one output feature map with smooth weights. Everything here is pure
numpy geometry, computed per axis; the 2-D grid is the outer product of two 1-D axes.

Per axis, with ``step_px = tile_px - overlap_px`` and ``blend_px = overlap_px - 2 * margin_px``:

* output chunk ``j`` covers image pixels ``[j * step_px, min((j + 1) * step_px, n_px))`` and
  there are ``n_windows = ceil(n_px / step_px)`` chunks and windows;
* window ``j`` covers image pixels ``[j * step_px - margin_px, j * step_px - margin_px + tile_px)``
  (it may stick out of the image: the caller reads it reflect-padded, see :func:`read_window`);
* window ``j``'s weight is exactly 0 in its first and last ``margin_px`` pixels (features there
  suffer from ViT edge effects), rises as ``sin(pi/2 t)**2`` over the next ``blend_px`` pixels,
  is 1 in the middle and falls as ``cos(pi/2 t)**2`` over the last ``blend_px`` pixels before the
  far margin. The first window does not rise and the last does not fall (weight 1 there).

Hence window ``j``'s weight is non-zero from the first pixel of chunk ``j`` up to the first
``blend_px`` pixels of chunk ``j + 1``, where window ``j + 1`` rises with the complementary
profile: every pixel gets total weight 1, and the cells of chunk ``(j, i)`` receive features
only from windows ``(j, i)``, ``(j - 1, i)``, ``(j, i - 1)`` and ``(j - 1, i - 1)``.

Coordinates follow the rest of the package: pixel ``p`` has its centre at ``p`` and output cell
``k`` covers pixels ``[k * out_stride, (k + 1) * out_stride)``, centred at
``k * out_stride + (out_stride - 1) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ._checks import as_int as _as_int
from .errors import ConfigError

__all__ = ["TileGrid", "plan_tiles", "read_window", "reflect_index", "windows_touching"]


def _as_pair(name: str, value: Any, minimum: int | None, fix: str) -> tuple[int, int]:
    """``value`` as a pair of Python ints (each ``>= minimum`` unless ``minimum`` is None)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ConfigError(f"{name} must be a pair of integers (y, x), got {value!r}; {fix}.")
    if len(value) != 2:
        raise ConfigError(
            f"{name} must have 2 entries (y, x), got {len(value)} in {value!r}; {fix}."
        )
    out = []
    for axis, v in zip("yx", value, strict=True):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ConfigError(
                f"{name} must hold integers, got {v!r} for {axis} in {value!r}; {fix}."
            )
        if minimum is not None and v < minimum:
            raise ConfigError(
                f"{name} must be >= {minimum} along both axes, got {v!r} for {axis} in "
                f"{value!r}; {fix}."
            )
        out.append(int(v))
    return out[0], out[1]


def _round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= value``."""
    return -(-value // multiple) * multiple


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Map integer indices onto ``[0, n)`` by reflection, the edge not repeated.

    This is ``numpy.pad(..., mode="reflect")`` as an index map: it reflects as often as needed, so
    any index (however far outside) is valid, and an axis of length 1 maps everything to 0.

    Parameters
    ----------
    index : numpy.ndarray
        Integer indices of any shape, possibly negative or ``>= n``.
    n : int
        Length of the axis, ``>= 1``.

    Returns
    -------
    numpy.ndarray
        Integer array of ``index``'s shape with values in ``[0, n)``.

    Examples
    --------
    >>> reflect_index(np.arange(-3, 7), 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    >>> reflect_index(np.array([-2, 0, 5]), 1).tolist()
    [0, 0, 0]
    """
    n = _as_int("n", n, 1, "pass the length of the axis being indexed")
    index = np.asarray(index)
    if not np.issubdtype(index.dtype, np.integer):
        raise ConfigError(
            f"index must be an integer array, got dtype {index.dtype}; convert it with "
            ".astype(np.int64) after rounding."
        )
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    m = np.mod(index, period)
    return np.where(m < n, m, period - m)


def read_window(
    shape: Sequence[int], origin: Sequence[int], size: int
) -> tuple[tuple[slice, slice], tuple[np.ndarray, np.ndarray]]:
    """How to read a reflect-padded ``size x size`` window from an image of ``shape``.

    The window's top-left pixel is ``origin`` in image coordinates and may lie outside the image
    (so may the whole window). Only the in-bounds block that the reflected window touches is read.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(H, W)`` in pixels, both ``>= 1``.
    origin : tuple of int
        Image pixel ``(y, x)`` of the window's top-left corner; may be negative or past the end.
    size : int
        Window side in pixels, ``>= 1``.

    Returns
    -------
    src : tuple of slice
        In-bounds ``(rows, cols)`` slices of the image to read (steps of 1, within ``[0, H)`` and
        ``[0, W)``).
    index : tuple of numpy.ndarray
        Integer ``(rows, cols)`` arrays, each ``(size,)``, into the block read with ``src``:
        ``image[src][np.ix_(*index)]`` is the window of the ``mode="reflect"`` padded image.

    Examples
    --------
    >>> image = np.arange(12).reshape(3, 4)
    >>> src, (rows, cols) = read_window(image.shape, (-1, 2), 3)
    >>> src
    (slice(0, 2, None), slice(2, 4, None))
    >>> image[src][np.ix_(rows, cols)].tolist()
    [[6, 7, 6], [2, 3, 2], [6, 7, 6]]
    """
    h, w = _as_pair("shape", shape, 1, "pass the (H, W) shape of a non-empty image")
    oy, ox = _as_pair("origin", origin, None, "pass the (y, x) pixel of the window's top-left")
    size = _as_int("size", size, 1, "pass the window side in pixels, e.g. tile_px")
    src = []
    index = []
    for o, n in ((oy, h), (ox, w)):
        idx = reflect_index(np.arange(o, o + size, dtype=np.intp), n)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        src.append(slice(lo, hi))
        index.append(idx - lo)
    return (src[0], src[1]), (index[0], index[1])


def _profile(
    *,
    n_cells: int,
    out_stride: int,
    tile_px: int,
    margin_px: int,
    step_px: int,
    blend_px: int,
    first: bool,
    last: bool,
) -> np.ndarray:
    """Blend weights ``(n_cells,)`` float64 at the cell centres of one window (see module doc)."""
    u = np.arange(n_cells, dtype=np.float64) * out_stride + (out_stride - 1) / 2
    w = np.ones(n_cells, dtype=np.float64)
    if not first:
        rise = (u >= margin_px) & (u < margin_px + blend_px)
        t = (u[rise] - margin_px + 0.5) / blend_px
        w[rise] = np.sin(np.pi / 2 * t) ** 2
    if not last:
        fall = (u >= margin_px + step_px) & (u < margin_px + step_px + blend_px)
        t = (u[fall] - margin_px - step_px + 0.5) / blend_px
        w[fall] = np.cos(np.pi / 2 * t) ** 2
    w[(u < margin_px) | (u >= tile_px - margin_px)] = 0.0
    return w


@dataclass(frozen=True)
class TileGrid:
    """The window and output-chunk grid of one image.

    Parameters
    ----------
    image_shape : tuple of int
        Image ``(H, W)`` in pixels, both ``>= 1``.
    tile_px : int
        Window side in pixels; a multiple of ``out_stride``.
    overlap_px : int
        Pixels shared by neighbouring windows, ``< tile_px``; ``overlap_px - 2 * margin_px`` (the
        blend width) must be ``> 0``, ``<= step_px`` and, like ``step_px``, a multiple of
        ``out_stride``.
    margin_px : int
        Pixels along every window edge whose features are discarded (weight exactly 0),
        ``>= 0``, a multiple of ``out_stride``.
    out_stride : int, optional
        Image pixels per output cell, ``>= 1``.

    Examples
    --------
    >>> g = TileGrid((1000, 700), tile_px=518, overlap_px=72, margin_px=22)
    >>> g.step_px, g.blend_px, g.n_windows, g.out_shape
    (446, 28, (3, 2), (1000, 700))
    >>> g.window_origin(1, 0), g.chunk_slices(2, 1)
    ((424, -22), (slice(892, 1000, None), slice(446, 700, None)))
    """

    image_shape: tuple[int, int]
    tile_px: int
    overlap_px: int
    margin_px: int
    out_stride: int = 1

    def __post_init__(self) -> None:
        shape = _as_pair("image_shape", self.image_shape, 1, "pass the (H, W) of a non-empty image")
        s = _as_int("out_stride", self.out_stride, 1, "use the pixels per output cell, e.g. 1")
        tile = _as_int("tile_px", self.tile_px, 1, "use a positive window side such as 518")
        overlap = _as_int("overlap_px", self.overlap_px, 0, "use plan_tiles() for a valid overlap")
        margin = _as_int("margin_px", self.margin_px, 0, "use plan_tiles() for a valid margin")
        for name, value in (
            ("image_shape", shape),
            ("out_stride", s),
            ("tile_px", tile),
            ("overlap_px", overlap),
            ("margin_px", margin),
        ):
            object.__setattr__(self, name, value)
        if tile % s:
            raise ConfigError(
                f"tile_px={tile} is not a multiple of out_stride={s}, so window cells would not "
                f"align with the output grid; use tile_px={_round_up(tile, s)} or an out_stride "
                f"that divides {tile}."
            )
        if margin % s:
            raise ConfigError(
                f"margin_px={margin} is not a multiple of out_stride={s}; use "
                f"margin_px={_round_up(margin, s)}."
            )
        if overlap >= tile:
            raise ConfigError(
                f"overlap_px={overlap} must be smaller than tile_px={tile} (the step between "
                f"windows, tile_px - overlap_px, must be > 0); use tile_px >= "
                f"{_round_up(2 * overlap - 2 * margin, s)} or a smaller overlap_px."
            )
        blend = overlap - 2 * margin
        if blend <= 0:
            raise ConfigError(
                f"overlap_px={overlap} leaves no room to blend windows: it must exceed "
                f"2 * margin_px = {2 * margin}; use overlap_px >= {2 * margin + s}."
            )
        if overlap % s:
            raise ConfigError(
                f"overlap_px={overlap} is not a multiple of out_stride={s}, so step_px="
                f"{tile - overlap} and blend_px={blend} are not whole output cells; use "
                f"overlap_px={_round_up(overlap, s)}."
            )
        step = tile - overlap
        if blend > step:
            raise ConfigError(
                f"overlap_px={overlap} gives blend_px={blend} wider than step_px={step}, so more "
                f"than two windows would overlap; use overlap_px <= "
                f"{(tile + 2 * margin) // 2 // s * s} or tile_px >= "
                f"{_round_up(2 * overlap - 2 * margin, s)}."
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def step_px(self) -> int:
        """Pixels between window origins, and the side of an output chunk in pixels."""
        return self.tile_px - self.overlap_px

    @property
    def blend_px(self) -> int:
        """Width in pixels of the zone where two neighbouring windows cross-fade."""
        return self.overlap_px - 2 * self.margin_px

    @property
    def n_windows(self) -> tuple[int, int]:
        """Number of windows (and output chunks) ``(ny, nx)``."""
        h, w = self.image_shape
        return -(-h // self.step_px), -(-w // self.step_px)

    @property
    def out_shape(self) -> tuple[int, int]:
        """Output feature map ``(rows, cols)`` in cells, ``ceil((H, W) / out_stride)``."""
        h, w = self.image_shape
        return -(-h // self.out_stride), -(-w // self.out_stride)

    @property
    def chunk_cells(self) -> int:
        """Side of an output chunk in cells (the last chunk along an axis may be smaller)."""
        return self.step_px // self.out_stride

    @property
    def tile_cells(self) -> int:
        """Side of a window in output cells."""
        return self.tile_px // self.out_stride

    # ------------------------------------------------------------------ per-window geometry
    def _check_window(self, axis: int, j: int) -> int:
        if axis not in (0, 1):
            raise ConfigError(f"axis must be 0 (y) or 1 (x), got {axis!r}.")
        n = self.n_windows[axis]
        name = "j" if axis == 0 else "i"
        if isinstance(j, bool) or not isinstance(j, int | np.integer) or not 0 <= j < n:
            raise ConfigError(
                f"window index {name}={j!r} is out of range along axis {axis}; use an integer in "
                f"[0, {n}) (n_windows={self.n_windows})."
            )
        return int(j)

    def window_origin(self, j: int, i: int) -> tuple[int, int]:
        """Image pixel ``(y, x)`` of window ``(j, i)``'s top-left corner (may be negative).

        >>> TileGrid((100, 100), tile_px=56, overlap_px=20, margin_px=4).window_origin(0, 2)
        (-4, 68)
        """
        j, i = self._check_window(0, j), self._check_window(1, i)
        return j * self.step_px - self.margin_px, i * self.step_px - self.margin_px

    def window_slices(self, j: int, i: int) -> tuple[slice, slice]:
        """Image-pixel ``(rows, cols)`` slices of window ``(j, i)``, each ``tile_px`` long.

        They may extend outside ``[0, H)`` x ``[0, W)`` (negative starts included), so do not
        index an array with them directly: read through :func:`read_window`.
        """
        y, x = self.window_origin(j, i)
        return slice(y, y + self.tile_px), slice(x, x + self.tile_px)

    def chunk_slices(self, j: int, i: int) -> tuple[slice, slice]:
        """Output-cell ``(rows, cols)`` slices of chunk ``(j, i)``, clipped to :attr:`out_shape`.

        >>> g = TileGrid((100, 100), tile_px=56, overlap_px=20, margin_px=4, out_stride=2)
        >>> g.chunk_slices(2, 0)
        (slice(36, 50, None), slice(0, 18, None))
        """
        j, i = self._check_window(0, j), self._check_window(1, i)
        c = self.chunk_cells
        rows, cols = self.out_shape
        return slice(j * c, min((j + 1) * c, rows)), slice(i * c, min((i + 1) * c, cols))

    def weights_1d(self, axis: int, j: int) -> np.ndarray:
        """Blend profile ``(tile_cells,)`` float64 of window ``j`` along ``axis`` (0 = y, 1 = x).

        Evaluated at the output-cell centres in window coordinates; exactly 0 within
        ``margin_px`` of both window edges.

        >>> g = TileGrid((20, 20), tile_px=8, overlap_px=4, margin_px=1)
        >>> np.round(g.weights_1d(0, 1), 3).tolist()
        [0.0, 0.146, 0.854, 1.0, 1.0, 0.854, 0.146, 0.0]
        >>> np.round(g.weights_1d(1, 0), 3).tolist()  # the first window does not rise
        [0.0, 1.0, 1.0, 1.0, 1.0, 0.854, 0.146, 0.0]
        """
        j = self._check_window(axis, j)
        return _profile(
            n_cells=self.tile_cells,
            out_stride=self.out_stride,
            tile_px=self.tile_px,
            margin_px=self.margin_px,
            step_px=self.step_px,
            blend_px=self.blend_px,
            first=j == 0,
            last=j == self.n_windows[axis] - 1,
        )

    def weights(self, j: int, i: int) -> np.ndarray:
        """Blend weights ``(tile_cells, tile_cells)`` float64 of window ``(j, i)``.

        The outer product of :meth:`weights_1d` along y and x. Added at output cell offset
        ``window_origin(j, i) // out_stride``, the weights of all windows sum to 1 in every cell.
        """
        return np.outer(self.weights_1d(0, j), self.weights_1d(1, i))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (``image_shape`` as a list), the inverse of from_dict."""
        return {
            "image_shape": list(self.image_shape),
            "tile_px": self.tile_px,
            "overlap_px": self.overlap_px,
            "margin_px": self.margin_px,
            "out_stride": self.out_stride,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TileGrid:
        """Build (and check) a grid from a mapping such as the output of :meth:`to_dict`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"TileGrid.from_dict needs a mapping, got {type(d).__name__}.")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(
                f"Unknown TileGrid keys {unknown}; the keys are {names} (remove the others)."
            )
        missing = [n for n in names if n not in d and n != "out_stride"]
        if missing:
            raise ConfigError(
                f"TileGrid keys {missing} are missing from {dict(d)!r}; add them, or build the "
                "grid with plan_tiles()."
            )
        return cls(**dict(d))


def plan_tiles(
    image_shape: Sequence[int],
    *,
    tile_px: int = 518,
    overlap_px: int | None = None,
    patch_px: int = 14,
    stride_px: int = 14,
    max_shift_px: int = 1,
    out_stride: int = 1,
) -> TileGrid:
    """Plan the window grid for an image and a backbone.

    The margin is ``ceil(1.5 * patch_px + max_shift_px)`` rounded up to a multiple of
    ``lcm(stride_px, out_stride)``: it discards the patches at the window edge, and the ones
    next to them, in every shifted view, and keeps every window on the image's patch grid. The
    default overlap adds a blend of ``2 * patch_px`` (rounded up likewise) to both margins.

    Parameters
    ----------
    image_shape : tuple of int
        Image ``(H, W)`` in pixels.
    tile_px : int, optional
        Window side in pixels: a multiple of ``stride_px`` and of ``out_stride``, ``>= patch_px``.
    overlap_px : int, optional
        Pixels shared by neighbouring windows; default ``2 * margin + blend`` as above. At least
        ``2 * margin + out_stride``.
    patch_px : int, optional
        Backbone patch size in pixels (14 for DINOv2).
    stride_px : int, optional
        Backbone patch-embedding stride in pixels (14 for DINOv2).
    max_shift_px : int, optional
        Largest shift, in pixels, of any view of the ensemble (``TransformSet.max_shift_px``).
    out_stride : int, optional
        Image pixels per output cell.

    Returns
    -------
    TileGrid

    Examples
    --------
    >>> g = plan_tiles((5000, 5000))
    >>> g.margin_px, g.overlap_px, g.step_px, g.n_windows
    (28, 84, 434, (12, 12))
    >>> g = plan_tiles((5000, 5000), out_stride=14)
    >>> g.margin_px, g.overlap_px, g.step_px, g.chunk_cells
    (28, 84, 434, 31)
    """
    s = _as_int("out_stride", out_stride, 1, "use the pixels per output cell, e.g. 1")
    patch = _as_int("patch_px", patch_px, 1, "use the backbone's patch size, e.g. 14")
    stride = _as_int("stride_px", stride_px, 1, "use the backbone's patch stride, e.g. 14")
    shift = _as_int("max_shift_px", max_shift_px, 0, "use the ensemble's largest shift, e.g. 1")
    tile = _as_int("tile_px", tile_px, 1, f"use a multiple of stride_px={stride}, e.g. 518")
    if tile % stride:
        lo, hi = tile // stride * stride, _round_up(tile, stride)
        fix = f"tile_px={hi}" if lo < patch else f"tile_px={lo} or {hi}"
        raise ConfigError(
            f"tile_px={tile} is not a multiple of the backbone stride_px={stride}; use {fix}."
        )
    if tile < patch:
        raise ConfigError(
            f"tile_px={tile} is smaller than one patch_px={patch}; use tile_px >= "
            f"{_round_up(patch, stride)} (518 is a good default)."
        )
    if tile % s:
        unit = math.lcm(stride, s)
        lo, hi = tile // unit * unit, _round_up(tile, unit)
        fix = f"tile_px={hi}" if lo < patch else f"tile_px={lo} or {hi}"
        raise ConfigError(
            f"tile_px={tile} is not a multiple of out_stride={s}, so window cells would not align "
            f"with the output grid; use {fix} (multiples of stride_px={stride} and out_stride), "
            f"or an out_stride that divides {tile}."
        )
    # Margin and blend are multiples of the patch stride too, so that every window's patch grid
    # lies on the image's global patch grid (tiled results then match whole-image ones).
    unit = math.lcm(stride, s)
    margin = _round_up((3 * patch + 1) // 2 + shift, unit)
    default_overlap = 2 * margin + _round_up(2 * patch, unit)
    if overlap_px is None:
        overlap = default_overlap
    else:
        overlap = _as_int("overlap_px", overlap_px, 0, f"use e.g. overlap_px={default_overlap}")
        if overlap < 2 * margin + s:
            raise ConfigError(
                f"overlap_px={overlap} is too small: it must be at least 2 * margin_px + "
                f"out_stride = {2 * margin + s} (margin_px={margin} for patch_px={patch}, "
                f"max_shift_px={shift}); use overlap_px={default_overlap} (the default)."
            )
    min_tile = _round_up(2 * overlap - 2 * margin, math.lcm(stride, s))
    if tile < min_tile:
        raise ConfigError(
            f"tile_px={tile} is too small for overlap_px={overlap} and margin_px={margin} (the "
            f"step between windows must be at least the blend width {overlap - 2 * margin}); "
            f"use tile_px >= {min_tile} (518 is a good default)"
            + ("." if overlap_px is None else " or a smaller overlap_px.")
        )
    return TileGrid(
        image_shape=image_shape,
        tile_px=tile,
        overlap_px=overlap,
        margin_px=margin,
        out_stride=s,
    )


def windows_touching(grid: TileGrid, mask: np.ndarray) -> np.ndarray:
    """Which windows of ``grid`` give weight to the True pixels of ``mask``.

    Parameters
    ----------
    grid : TileGrid
        The window grid of an image of ``grid.image_shape``.
    mask : numpy.ndarray
        ``(h, w)`` bool mask covering the whole image at any resolution (a thumbnail); mask
        pixel ``(r, c)`` covers image pixels ``[r * H / h, (r + 1) * H / h)`` and likewise in x.

    Returns
    -------
    numpy.ndarray
        ``grid.n_windows`` bool: True where the window's non-zero weights (its tile less the
        ``margin_px`` on each side) meet the mask. Every pixel of the mask's foreground keeps all
        the windows that give it weight, so its features are unchanged.

    Examples
    --------
    >>> g = plan_tiles((400, 400), tile_px=224, patch_px=14, stride_px=14, max_shift_px=1)
    >>> m = np.zeros((4, 4), bool); m[1, 1] = True  # image pixels 100..199
    >>> windows_touching(g, m).astype(int).tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    """
    m = np.asarray(mask)
    if m.ndim != 2 or 0 in m.shape:
        raise ConfigError(f"mask must be a non-empty 2-D array, got shape {m.shape}.")
    m = m.astype(bool)
    # summed-area table: any() over a rectangle in O(1)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    out = np.zeros(grid.n_windows, bool)
    bounds = []
    for axis in (0, 1):
        n_px, n_mask = grid.image_shape[axis], m.shape[axis]
        lo_hi = []
        for j in range(grid.n_windows[axis]):
            o = grid.window_origin(j, 0)[0] if axis == 0 else grid.window_origin(0, j)[1]
            # the window's non-zero weights: its tile less the margins on both sides
            a, b = max(o + grid.margin_px, 0), min(o + grid.tile_px - grid.margin_px, n_px)
            lo = int(np.floor(a * n_mask / n_px))
            hi = max(lo + 1, int(np.ceil(b * n_mask / n_px)))
            lo_hi.append((lo, min(hi, n_mask)))
        bounds.append(lo_hi)
    for j, (r0, r1) in enumerate(bounds[0]):
        for i, (c0, c1) in enumerate(bounds[1]):
            out[j, i] = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0] > 0
    return out
