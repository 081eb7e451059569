"""Background skipping: foreground detection, window selection, masked runs, positional debias."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.masking import foreground_mask, otsu_threshold
from hrdv2_dask.tiling import plan_tiles, windows_touching


@pytest.fixture(scope="module")
def slide():
    """A 'slide': bright empty glass with a dark textured blob in the lower right (≈ 25 %)."""
    rng = np.random.default_rng(0)
    img = np.full((420, 560, 3), 242, np.uint8)
    img += rng.integers(0, 6, img.shape, dtype=np.uint8)  # glass is not perfectly flat
    yy, xx = np.mgrid[0:420, 0:560]
    blob = (yy - 300) ** 2 / 110**2 + (xx - 400) ** 2 / 140**2 < 1
    tissue = (np.sin(xx / 5.0) * np.cos(yy / 7.0) * 50 + 110).astype(np.uint8)
    img[blob] = np.stack([tissue, tissue // 2 + 40, tissue], -1)[blob]
    return img, blob


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(-3, 0.5, 700), rng.normal(4, 0.5, 300)]
    assert -1.5 < otsu_threshold(values) < 2.5


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.integers(0, 300), min_size=2, max_size=300).map(np.array)
    | st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=300).map(np.array),
    junk=st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), max_size=3),
)
def test_otsu_is_skimages_split_of_the_finite_values(values, junk):
    from skimage.filters import threshold_otsu

    values = values.astype(np.float64)
    t = otsu_threshold(np.r_[values, junk])  # NaN and infinite values are dropped
    if np.ptp(values) == 0:
        assert t == values[0]
        return
    assert t == otsu_threshold(values)
    counts, edges = np.histogram(values, bins=256, range=(values.min(), values.max()))
    bin_of = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, 255)
    k = np.clip(np.searchsorted(edges, threshold_otsu(values), side="right") - 1, 0, 255)
    # the same classes as skimage's threshold bin, and no bin split by values > t
    assert np.array_equal(values > t, bin_of > k)


def test_foreground_mask_finds_the_tissue(slide):
    img, blob = slide
    fg = foreground_mask(img[::4, ::4], dilate_px=0)
    truth = blob[::4, ::4]
    assert (fg == truth).mean() > 0.97
    dark = foreground_mask(255 - img[::4, ::4], background="dark", dilate_px=0)
    assert (dark == fg).mean() > 0.99  # Otsu on the inverted image, up to its histogram bins
    assert foreground_mask(np.full((5, 5), 7.0)).all()  # one gray level: skip nothing


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(30, 400),
    w=st.integers(30, 400),
    mh=st.integers(1, 40),
    mw=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_windows_touching_matches_brute_force(h, w, mh, mw, seed):
    grid = plan_tiles((h, w), tile_px=112, patch_px=14, stride_px=14, max_shift_px=1)
    mask = np.random.default_rng(seed).random((mh, mw)) < 0.05
    got = windows_touching(grid, mask)
    # brute force: upsample the mask to pixels with the documented rule, then look per window
    rows = np.minimum((np.arange(h) * mh) // h, mh - 1)
    cols = np.minimum((np.arange(w) * mw) // w, mw - 1)
    full = mask[np.ix_(rows, cols)]
    for j in range(grid.n_windows[0]):
        for i in range(grid.n_windows[1]):
            oy, ox = (o + grid.margin_px for o in grid.window_origin(j, i))
            support = grid.tile_px - 2 * grid.margin_px
            region = full[max(oy, 0) : oy + support, max(ox, 0) : ox + support]
            # the mapping may only widen a window's footprint (it is conservative)
            if region.any():
                assert got[j, i]


def test_masked_run_skips_background_and_keeps_foreground_bit_identical(
    slide, tmp_path, tiny_random_dinov2, local_client
):
    img, blob = slide
    kw = dict(
        backbone=tiny_random_dinov2,
        tile=140,
        out_stride=2,
        dtype="float32",
        client=local_client,
        progress=False,
        block=1,
    )
    full = hd.extract(img, tmp_path / "full.zarr", **kw)
    masked = hd.extract(img, tmp_path / "masked.zarr", mask="auto", **kw)
    assert masked.attrs["mask"] == "auto"
    assert masked.attrs["skipped_windows"] >= 0.4 * (
        masked.attrs["skipped_windows"] + masked.attrs["computed_windows"]
    )
    a, b = full.values, masked.values
    fg = blob[::2, ::2]
    assert np.isfinite(b[:, fg]).all()
    assert np.array_equal(a[:, fg], b[:, fg])  # foreground keeps every window: same bits
    nan = np.isnan(b).all(0)
    assert nan.mean() > 0.3 and not (nan & fg).any()
    assert np.isnan(b).any(0).sum() == nan.sum()  # a cell is all-NaN or all-finite


def test_mask_from_file_and_clear_errors(slide, tmp_path, local_client, capsys):
    from PIL import Image

    img, blob = slide
    np.save(tmp_path / "img.npy", img)
    Image.fromarray((blob[::7, ::7] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    kw = dict(backbone=hd.MeanPool(), tile=140, client=local_client, progress=False)
    out = hd.extract(img, tmp_path / "f.zarr", mask=str(tmp_path / "mask.png"), **kw)
    assert out.attrs["skipped_windows"] > 0 and out.attrs["mask"].endswith("mask.png")
    with pytest.raises(hd.InputError, match="aspect ratio"):
        hd.extract(img, tmp_path / "g.zarr", mask=np.ones((10, 40), bool), **kw)
    with pytest.raises(hd.InputError, match="no foreground"):
        hd.extract(img, tmp_path / "h.zarr", mask=np.zeros((42, 56), bool), **kw)
    with pytest.raises(hd.ConfigError, match="mask must be"):
        hd.extract(img, tmp_path / "i.zarr", mask=3, **kw)
    code = main(
        [
            "features",
            str(tmp_path / "img.npy"),
            str(tmp_path / "cli.zarr"),
            "--weights",
            "random",
            "--mask",
            str(tmp_path / "nope.png"),
            "--quiet",
        ]
    )
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hrdv2: error")]
    assert code == 2 and len(errors) == 1 and "nope.png" in errors[0]
    if (tmp_path / "cli.zarr").exists():
        with pytest.raises(hd.Hrdv2Error):
            hd.open_features(tmp_path / "cli.zarr")


def _phase_power(f: np.ndarray, period: int) -> float:
    """Variance of the period-folded mean map over the variance of the map (per channel mean)."""
    c, h, w = f.shape
    ny, nx = h // period, w // period
    f = f[:, : ny * period, : nx * period] - f.mean(axis=(1, 2), keepdims=True)
    folded = f.reshape(c, ny, period, nx, period).mean(axis=(1, 3))
    return float((folded.var(axis=(1, 2)) / f.var(axis=(1, 2))).mean())


def test_debias_reduces_the_periodic_window_artefact(tmp_path, tiny_random_dinov2, local_client):
    """On a stationary texture, features folded at the window stride show the window pattern;
    subtracting the estimated positional bias removes most of it."""
    rng = np.random.default_rng(1)
    img = rng.integers(120, 136, (560, 560, 3), dtype=np.uint8)  # nearly flat, like the micrograph
    kw = dict(
        backbone=tiny_random_dinov2,
        tile=168,
        dtype="float32",
        client=local_client,
        progress=False,
        out_stride=2,
    )
    plain = hd.extract(img, tmp_path / "plain.zarr", **kw)
    clean = hd.extract(img, tmp_path / "clean.zarr", debias=12, **kw)
    assert clean.attrs["debias"] == 12
    period = (plain.attrs["tile_px"] - plain.attrs["overlap_px"]) // 2
    p0, p1 = _phase_power(plain.values, period), _phase_power(clean.values, period)
    assert p1 < 0.5 * p0, (p0, p1)
    with pytest.raises(hd.ConfigError, match="debias"):
        hd.extract(img, tmp_path / "bad.zarr", debias=-1, **kw)
