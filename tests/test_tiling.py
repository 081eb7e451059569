"""Tiling: weights are a partition of unity, margins are spoiled, reflect reads match numpy.pad."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hrdv2_dask.errors import ConfigError
from hrdv2_dask.tiling import TileGrid, plan_tiles, read_window, reflect_index

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


@st.composite
def grids(draw, max_px: int = 3000) -> TileGrid:
    """Valid grids from plan_tiles: DINOv2 patch/stride 14, default or explicit overlap."""
    shape = (draw(st.integers(1, max_px)), draw(st.integers(1, max_px)))
    tile = 14 * draw(st.integers(4, 74))
    s = draw(st.sampled_from([1, 2, 7, 14]))
    shift = draw(st.integers(0, 6))
    overlap = None
    if draw(st.booleans()):
        margin = math.ceil((math.ceil(1.5 * 14 + shift)) / s) * s
        overlap = 2 * margin + s * draw(st.integers(1, 8))
    try:
        return plan_tiles(shape, tile_px=tile, overlap_px=overlap, max_shift_px=shift, out_stride=s)
    except ConfigError:
        assume(False)


def _global_sum(g: TileGrid) -> np.ndarray:
    """Sum of all windows' weights on the output grid, each added at its cell offset."""
    rows, cols = g.out_shape
    tc, s = g.tile_cells, g.out_stride
    total = np.zeros((rows, cols))
    ny, nx = g.n_windows
    for j in range(ny):
        for i in range(nx):
            y0, x0 = (o // s for o in g.window_origin(j, i))
            w = g.weights(j, i)
            ys, xs = slice(max(y0, 0), min(y0 + tc, rows)), slice(max(x0, 0), min(x0 + tc, cols))
            total[ys, xs] += w[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return total


def _check_axis(g: TileGrid, axis: int) -> None:
    """1-D partition of unity, exact-zero margins, support = own chunk + next chunk's blend."""
    n_cells = g.out_shape[axis]
    n = g.n_windows[axis]
    s, tc, cc = g.out_stride, g.tile_cells, g.chunk_cells
    mc, bc = g.margin_px // s, g.blend_px // s
    total = np.zeros(n_cells)
    for j in range(n):
        w = g.weights_1d(axis, j)
        assert w.shape == (tc,) and w.dtype == np.float64
        assert np.all(w[:mc] == 0.0) and np.all(w[tc - mc :] == 0.0)
        assert np.all((w >= 0.0) & (w <= 1.0))
        origin = g.window_origin(j, 0)[0] if axis == 0 else g.window_origin(0, j)[1]
        assert origin == j * g.step_px - g.margin_px and origin % s == 0
        k0 = origin // s
        nz = np.flatnonzero(w) + k0  # global cells with non-zero weight
        assert nz[0] == j * cc  # starts exactly at its chunk's first cell
        assert nz[-1] == j * cc + cc + bc - 1  # (the last window's tail lies past the image)
        inside = nz[(nz >= 0) & (nz < n_cells)]
        chunk_of_cell = inside // cc
        assert set(np.unique(chunk_of_cell - j).tolist()) <= {0, 1}
        lo, hi = max(k0, 0), min(k0 + tc, n_cells)
        total[lo:hi] += w[lo - k0 : hi - k0]
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)


@FAST
@given(grids())
def test_weights_1d_partition_margins_support(g):
    _check_axis(g, 0)
    _check_axis(g, 1)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(grids(max_px=3000))
def test_weights_2d_sum_to_one_and_only_four_windows_per_chunk(g):
    ny, nx = g.n_windows
    assume(ny * nx <= 2500)  # keeps the window loop fast; the 1-D test covers bigger grids
    total = _global_sum(g)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    rows, cols = g.out_shape
    tc, s, cc, mc = g.tile_cells, g.out_stride, g.chunk_cells, g.margin_px // g.out_stride
    for j in range(ny):
        for i in range(nx):
            w = g.weights(j, i)
            assert w.shape == (tc, tc)
            np.testing.assert_array_equal(w, np.outer(g.weights_1d(0, j), g.weights_1d(1, i)))
            # exactly zero within margin_px of every edge
            for edge in (w[:mc], w[tc - mc :], w[:, :mc], w[:, tc - mc :]):
                assert np.all(edge == 0.0)
            y0, x0 = (o // s for o in g.window_origin(j, i))
            yy, xx = np.nonzero(w)
            yy, xx = yy + y0, xx + x0
            # non-zero region starts at the window's own chunk start
            assert yy.min() == j * cc and xx.min() == i * cc
            keep = (yy < rows) & (xx < cols)
            # every cell this window touches belongs to chunk (j, i), (j+1, i), (j, i+1), (j+1, i+1)
            assert set(np.unique(yy[keep] // cc - j).tolist()) <= {0, 1}
            assert set(np.unique(xx[keep] // cc - i).tolist()) <= {0, 1}


def test_weights_explicit_numbers():
    g = TileGrid((20, 20), tile_px=8, overlap_px=4, margin_px=1)
    assert (g.step_px, g.blend_px, g.n_windows) == (4, 2, (5, 5))
    a, b = np.sin(np.pi / 8) ** 2, np.sin(3 * np.pi / 8) ** 2
    np.testing.assert_allclose(g.weights_1d(0, 2), [0, a, b, 1, 1, b, a, 0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(g.weights_1d(1, 0), [0, 1, 1, 1, 1, b, a, 0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(g.weights_1d(1, 4), [0, a, b, 1, 1, 1, 1, 0], rtol=0, atol=1e-15)
    assert g.weights(0, 4)[0, 0] == 0.0 and g.weights(0, 4)[1, 1] == pytest.approx(a)


def test_weights_at_output_stride_are_cell_centre_samples():
    g = TileGrid((1000, 1000), tile_px=56, overlap_px=28, margin_px=7, out_stride=7)
    ref = TileGrid((1000, 1000), tile_px=56, overlap_px=28, margin_px=7)  # same pixel geometry
    # out_stride 7: cell k is centred at pixel 7k + 3, i.e. pixel-resolution sample 7k + 3
    np.testing.assert_array_equal(g.weights_1d(0, 3), ref.weights_1d(0, 3)[3::7])
    assert g.tile_cells == 8 and g.chunk_cells == 4 and g.out_shape == (143, 143)


def test_single_window_is_flat_inside_margins():
    g = plan_tiles((100, 300))
    assert g.n_windows == (1, 1)
    w = g.weights(0, 0)
    m = g.margin_px
    assert np.all(w[m:-m, m:-m] == 1.0) and w.sum() == (g.tile_px - 2 * m) ** 2


def test_plan_defaults():
    g = plan_tiles((5000, 5000))
    assert (g.margin_px, g.overlap_px, g.step_px, g.blend_px) == (28, 84, 434, 28)
    assert (g.tile_px, g.out_stride, g.n_windows, g.out_shape) == (518, 1, (12, 12), (5000, 5000))
    assert g.chunk_cells == 434 and g.tile_cells == 518
    g = plan_tiles((5000, 5000), out_stride=14)
    assert (g.margin_px, g.overlap_px, g.step_px, g.blend_px) == (28, 84, 434, 28)
    assert (g.chunk_cells, g.tile_cells, g.out_shape, g.n_windows) == (31, 37, (358, 358), (12, 12))
    g = plan_tiles((5000, 5000), max_shift_px=0)
    assert (g.margin_px, g.overlap_px) == (28, 84)  # on the patch grid


def test_geometry_of_windows_and_chunks():
    g = plan_tiles((1000, 500))
    assert g.n_windows == (3, 2)
    assert g.window_origin(0, 0) == (-28, -28)
    assert g.window_origin(2, 1) == (840, 406)
    assert g.window_slices(2, 1) == (slice(840, 1358), slice(406, 924))
    assert g.chunk_slices(0, 0) == (slice(0, 434), slice(0, 434))
    assert g.chunk_slices(2, 1) == (slice(868, 1000), slice(434, 500))
    g = plan_tiles((1000, 500), out_stride=14)
    assert g.out_shape == (72, 36) and g.chunk_slices(2, 1) == (slice(62, 72), slice(31, 36))


def _reflect_loop(image: np.ndarray, origin: tuple[int, int], size: int) -> np.ndarray:
    h, w = image.shape
    out = np.empty((size, size), image.dtype)
    for a in range(size):
        for b in range(size):
            r = reflect_index(np.array([origin[0] + a]), h)[0]
            c = reflect_index(np.array([origin[1] + b]), w)[0]
            out[a, b] = image[r, c]
    return out


@settings(max_examples=100, deadline=None, database=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    oy=st.integers(-150, 150),
    ox=st.integers(-150, 150),
    size=st.integers(1, 60),
)
def test_read_window_matches_numpy_pad(h, w, oy, ox, size):
    image = np.arange(h * w, dtype=np.int64).reshape(h, w)
    src, (rows, cols) = read_window((h, w), (oy, ox), size)
    for sl, n in zip(src, (h, w), strict=True):
        assert 0 <= sl.start < sl.stop <= n and sl.step is None
    assert rows.shape == (size,) and cols.shape == (size,)
    window = image[src][np.ix_(rows, cols)]
    big = 220
    ref = np.pad(image, big, mode="reflect")[oy + big : oy + big + size, ox + big : ox + big + size]
    np.testing.assert_array_equal(window, ref)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 3), (2, 5)])
@pytest.mark.parametrize("origin", [(0, 0), (-5, 9), (-40, -33), (25, -2), (100, 100)])
def test_read_window_tiny_images(shape, origin):
    image = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) * 10 + 3
    src, (rows, cols) = read_window(shape, origin, 11)
    window = image[src][np.ix_(rows, cols)]
    np.testing.assert_array_equal(window, _reflect_loop(image, origin, 11))
    if min(shape) > 1:
        big = 200
        pad = np.pad(image, big, mode="reflect")
        ref = pad[origin[0] + big : origin[0] + big + 11, origin[1] + big : origin[1] + big + 11]
        np.testing.assert_array_equal(window, ref)


def test_read_window_reads_only_the_needed_block():
    src, (rows, cols) = read_window((10_000, 8_000), (446 * 3 - 22, -22), 518)
    assert src == (slice(1316, 1834), slice(0, 496))
    assert rows.tolist() == list(range(518))
    assert cols[:23].tolist() == list(range(22, -1, -1))


def test_reflect_index_matches_numpy_pad_1d():
    for n in (1, 2, 3, 10):
        idx = np.arange(-70, 80)
        ref = np.pad(np.arange(n), 100, mode="reflect")[idx + 100]
        np.testing.assert_array_equal(reflect_index(idx, n), ref)


def test_round_trip():
    for g in (plan_tiles((123, 4567)), plan_tiles((3000, 20), tile_px=700, out_stride=14)):
        d = g.to_dict()
        assert json.loads(json.dumps(d)) == d
        back = TileGrid.from_dict(json.loads(json.dumps(d)))
        assert back == g and hash(back) == hash(g) and back.image_shape == g.image_shape
        assert isinstance(back.image_shape, tuple)


def test_numpy_integers_are_normalised():
    g = TileGrid((np.int64(100), np.int32(90)), tile_px=np.int64(56), overlap_px=20, margin_px=4)
    assert g.image_shape == (100, 90) and type(g.image_shape[0]) is int and type(g.tile_px) is int
    assert json.dumps(g.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(overlap_px=44), ["overlap_px=44", "at least", "2 * margin_px", "57", "84"]),
        (dict(overlap_px=30, out_stride=14), ["overlap_px=30", "70", "overlap_px=84"]),
        (dict(tile_px=520), ["tile_px=520", "stride_px=14", "tile_px=518 or 532"]),
        (dict(tile_px=7), ["tile_px=7", "stride_px=14", "tile_px=14"]),
        (dict(tile_px=14, patch_px=16), ["tile_px=14", "patch_px=16", "tile_px >= 28"]),
        (dict(tile_px=98, patch_px=14), ["tile_px=98", "too small", "tile_px >= 112"]),
        (dict(out_stride=4), ["tile_px=518", "out_stride=4", "tile_px=504 or 532"]),
        (dict(tile_px=0), ["tile_px", ">= 1", "0"]),
        (dict(tile_px=-14), ["tile_px", "-14"]),
        (dict(out_stride=0), ["out_stride", "0"]),
        (dict(patch_px=0), ["patch_px", "0"]),
        (dict(stride_px=-1), ["stride_px", "-1"]),
        (dict(max_shift_px=-1), ["max_shift_px", "-1"]),
        (dict(overlap_px=-3), ["overlap_px", "-3"]),
        (dict(tile_px=518.0), ["tile_px", "518.0", "integer"]),
        (dict(overlap_px=73, out_stride=2), ["overlap_px=73", "out_stride=2", "overlap_px=74"]),
    ],
)
def test_plan_errors(kwargs, words):
    with pytest.raises(ConfigError) as info:
        plan_tiles((1000, 1000), **kwargs)
    msg = str(info.value)
    for word in words:
        assert word in msg, msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (((0, 10), 56, 20, 4, 1), ["image_shape", ">= 1", "0"]),
        (((-5, 10), 56, 20, 4, 1), ["image_shape", "-5"]),
        (((10,), 56, 20, 4, 1), ["image_shape", "2 entries"]),
        ((10, 56, 20, 4, 1), ["image_shape", "pair"]),
        (((10, 10), 56, 56, 4, 1), ["overlap_px=56", "tile_px=56", "smaller"]),
        (((10, 10), 56, 8, 4, 1), ["overlap_px=8", "2 * margin_px = 8", "overlap_px >= 9"]),
        (((10, 10), 56, 40, 4, 1), ["blend_px=32", "step_px=16", "overlap_px <= 32"]),
        (((10, 10), 57, 20, 4, 2), ["tile_px=57", "out_stride=2", "tile_px=58"]),
        (((10, 10), 56, 20, 3, 2), ["margin_px=3", "out_stride=2", "margin_px=4"]),
        (((10, 10), 56, 21, 4, 1), []),  # odd overlap is fine at out_stride 1
        (((10, 10), 56, 22, 4, 4), ["overlap_px=22", "out_stride=4", "overlap_px=24"]),
        (((10, 10), 56, 20, -1, 1), ["margin_px", "-1"]),
        (((10, 10), 56, 20, 4, 0), ["out_stride", "0"]),
    ],
)
def test_grid_errors(args, words):
    shape, tile, overlap, margin, s = args
    if not words:
        TileGrid(shape, tile_px=tile, overlap_px=overlap, margin_px=margin, out_stride=s)
        return
    with pytest.raises(ConfigError) as info:
        TileGrid(shape, tile_px=tile, overlap_px=overlap, margin_px=margin, out_stride=s)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_index_and_dict_errors():
    g = plan_tiles((1000, 1000))
    with pytest.raises(ConfigError, match=r"j=3 .*\[0, 3\)"):
        g.weights(3, 0)
    with pytest.raises(ConfigError, match=r"i=-1"):
        g.window_origin(0, -1)
    with pytest.raises(ConfigError, match="axis"):
        g.weights_1d(2, 0)
    with pytest.raises(ConfigError, match="Unknown TileGrid keys"):
        TileGrid.from_dict({**g.to_dict(), "tile": 3})
    with pytest.raises(ConfigError, match=r"\['margin_px'\] are missing"):
        TileGrid.from_dict({k: v for k, v in g.to_dict().items() if k != "margin_px"})
    with pytest.raises(ConfigError, match="size"):
        read_window((10, 10), (0, 0), 0)
    with pytest.raises(ConfigError, match="shape"):
        read_window((0, 10), (0, 0), 3)
    with pytest.raises(ConfigError, match="n must be >= 1"):
        reflect_index(np.arange(3), 0)
    with pytest.raises(ConfigError, match="integer array"):
        reflect_index(np.array([0.5]), 3)
