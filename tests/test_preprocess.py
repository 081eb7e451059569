"""normalize: dtypes, layouts, channels, bad input; one intensity policy with the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hrdv2_dask as hd
from hrdv2_dask.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    fixed_intensity_range,
    intensity_range,
    sample_chunk_ids,
)
from hrdv2_dask.tiling import plan_tiles, read_window

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.mark.parametrize(
    "image, expected01",
    [
        (np.full((4, 5), 255, np.uint8), 1.0),
        (np.full((4, 5), 0, np.uint8), 0.0),
        (np.full((4, 5), 65535 // 5, np.uint16), 0.0),  # one level: (v, v + 1)
        (np.full((4, 5), 0.25, np.float32), 0.0),
        (np.ones((4, 5), bool), 1.0),
    ],
)
def test_dtypes_map_to_unit_range(image, expected01):
    x = hd.normalize(image)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    torch.testing.assert_close(unnormalize(x), torch.full((3, 4, 5), expected01), atol=1e-4, rtol=0)


def test_layouts_and_channels():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    ref = hd.normalize(rgb)
    torch.testing.assert_close(hd.normalize(np.moveaxis(rgb, -1, 0)), ref)  # CYX
    rgba = np.concatenate([rgb, np.zeros((6, 7, 1), np.uint8)], axis=-1)
    torch.testing.assert_close(hd.normalize(rgba), ref)  # alpha dropped
    gray = rgb[..., 0]
    g = unnormalize(hd.normalize(gray))
    for c in range(3):
        torch.testing.assert_close(g[c], torch.from_numpy(gray / 255).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hd.normalize(gray[..., None]), hd.normalize(gray))


def test_value_range_is_global_and_clips():
    img = np.array([[100, 200], [300, 400]], np.uint16)
    x = unnormalize(hd.normalize(img, value_range=(200, 300)))[0]
    torch.testing.assert_close(x, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.array([[np.nan, 0.5]], np.float32), "NaN"),
        (np.array([[np.inf, 0.5]], np.float64), "NaN or infinite"),
        (np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros((5, 6, 7), np.uint8), "shape"),
        (np.zeros((2, 3, 4, 5), np.uint8), "shape"),
        (np.zeros(5, np.uint8), "shape"),
        (np.zeros((4, 5), np.complex64), "dtype complex64"),
    ],
)
def test_bad_images_raise_value_error(image, match):
    with pytest.raises(ValueError, match=match) as info:
        hd.normalize(image)
    assert isinstance(info.value, hd.InputError)


RAMP = np.arange(1001).reshape(7, 143)  # 0.5/99.5 percentiles: 5 and 995


@pytest.mark.parametrize(
    "dtype", [np.uint16, np.int16, np.int32, np.uint32, np.int64, np.float32, np.float64]
)
def test_other_dtypes_map_their_percentiles_to_unit_range(dtype):
    x = unnormalize(hd.normalize(RAMP.astype(dtype)))
    expected = torch.from_numpy(np.clip((RAMP - 5) / 990, 0, 1)).float()
    for c in range(3):
        torch.testing.assert_close(x[c], expected, atol=1e-5, rtol=0)
    shifted = unnormalize(hd.normalize(RAMP.astype(np.float32) / 100 - 3))  # negatives too
    torch.testing.assert_close(shifted, x, atol=1e-5, rtol=0)
    assert intensity_range(RAMP.astype(dtype)[..., None]) == (5.0, 995.0)


def _naive_percentile(values: np.ndarray, q: float) -> float:
    s = np.sort(values.ravel())
    pos = q / 100 * (s.size - 1)
    k = int(np.floor(pos))
    return float(s[k] + (s[min(k + 1, s.size - 1)] - s[k]) * (pos - k))


@st.composite
def _samples(draw) -> np.ndarray:
    dtype = np.dtype(
        draw(st.sampled_from(["uint8", "bool", "uint16", "int16", "int32", "float32"]))
    )
    shape = draw(st.tuples(st.integers(1, 40), st.integers(1, 4)))
    floats = st.floats(-1e6, 1e6, width=32)
    return draw(hnp.arrays(dtype, shape, elements=floats if dtype.kind == "f" else None))


@settings(max_examples=60, deadline=None)
@given(sample=_samples())
def test_intensity_range_matches_naive_numpy(sample):
    lo, hi = intensity_range(sample)
    assert lo < hi and isinstance(lo, float) and isinstance(hi, float)
    if sample.dtype == np.uint8:
        assert (lo, hi) == (0.0, 255.0)
    elif sample.dtype == np.bool_:
        assert (lo, hi) == (0.0, 1.0)
    else:
        rgb = sample[:, :3].astype(np.float64)
        ref_lo, ref_hi = _naive_percentile(rgb, 0.5), _naive_percentile(rgb, 99.5)
        ref_hi = ref_lo + 1.0 if ref_hi <= ref_lo else ref_hi
        np.testing.assert_allclose((lo, hi), (ref_lo, ref_hi), rtol=1e-9, atol=1e-9)
    # chunking-invariant: any split of the pixels into "chunks" gives the same range
    parts = np.array_split(sample, 3)
    assert intensity_range(np.concatenate(parts[::-1]), dtype=sample.dtype) == (lo, hi)


def test_intensity_range_errors_and_fixed_dtypes():
    assert fixed_intensity_range(np.uint8) == (0.0, 255.0)
    assert fixed_intensity_range(np.bool_) == (0.0, 1.0)
    assert fixed_intensity_range(np.float32) is None and fixed_intensity_range(np.int16) is None
    assert intensity_range(None, dtype=np.uint8) == (0.0, 255.0)  # the dtype fixes it: not read
    with pytest.raises(hd.InputError, match="NaN or infinite"):
        intensity_range(np.array([[0.0, np.inf, 1.0]]))
    with pytest.raises(hd.InputError, match="empty sample"):
        intensity_range(np.zeros((0, 3), np.float32))
    with pytest.raises(hd.InputError, match="dtype <U1"):
        fixed_intensity_range(np.dtype("U1"))


def _pipeline_draw(numblocks_yx, seed, max_chunks):
    """The chunks the pipeline's value-range estimate drew before it called sample_chunk_ids."""
    ids = [(j, i) for j in range(numblocks_yx[0]) for i in range(numblocks_yx[1])]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(ids), size=min(max_chunks, len(ids)), replace=False))
    return [ids[k] for k in picked]


@settings(max_examples=60, deadline=None)
@given(
    ny=st.integers(0, 30),
    nx=st.integers(0, 30),
    seed=st.integers(0, 2**32 - 1),
    max_chunks=st.integers(1, 100),
)
def test_sample_chunk_ids_is_the_pipelines_seeded_draw(ny, nx, seed, max_chunks):
    ids = sample_chunk_ids((ny, nx), seed=seed, max_chunks=max_chunks)
    assert len(ids) == len(set(ids)) == min(max_chunks, ny * nx)
    assert all(0 <= j < ny and 0 <= i < nx for j, i in ids)
    assert ids == sorted(ids)
    assert ids == sample_chunk_ids((ny, nx), seed=seed, max_chunks=max_chunks)
    assert ids == _pipeline_draw((ny, nx), seed, max_chunks)
    if ny * nx <= max_chunks:
        assert ids == [(j, i) for j in range(ny) for i in range(nx)]


def test_sample_chunk_ids_bad_arguments():
    with pytest.raises(hd.ConfigError, match="max_chunks must be >= 1, got 0"):
        sample_chunk_ids((3, 3), max_chunks=0)
    with pytest.raises(hd.ConfigError, match="numblocks_yx must be an integer, got 2.5"):
        sample_chunk_ids((2.5, 3))


def _structured(dtype) -> np.ndarray:
    """280x336 px, three channels, smooth structure plus noise, in the dtype's typical range."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:280, 0:336]
    base = np.stack(
        [np.sin(xx / 13.0) * np.cos(yy / 9.0), np.cos(xx / 21.0 + yy / 17.0), xx / 336 - yy / 280],
        axis=-1,
    )
    unit = (base - base.min()) / np.ptp(base) + rng.normal(0, 0.05, base.shape)  # ~[0, 1]
    if dtype == np.uint8:
        return np.clip(unit * 255, 0, 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.clip(unit * 3000 + 200, 0, 65535).astype(np.uint16)  # far from 0..65535
    return (unit * 3 - 1).astype(np.float32)  # about [-1, 2]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("model", ["meanpool", "vit"])
def test_normalize_and_the_pipeline_use_one_intensity_policy(
    dtype, model, tmp_path, tiny_random_dinov2, local_client
):
    """The whole image through normalize's default range gives the tiled pipeline's features.

    MeanPool is local: tiled (several windows) equals whole away from the border. The ViT
    attends globally, so its reference is the pipeline's one window (420 px, reflect-padded)
    cut from ``normalize(img)``; normalising is per pixel, so padding after it is the same.
    """
    img = _structured(dtype)
    ts = hd.shifts((1, 2))
    if model == "meanpool":
        backbone, tile, rtol = hd.MeanPool(14, 14), 196, 1e-4
        x = hd.normalize(img)
    else:
        backbone, tile, rtol = tiny_random_dinov2, 420, 1e-3
        grid = plan_tiles(img.shape[:2], tile_px=tile, patch_px=14, stride_px=14, max_shift_px=2)
        assert grid.n_windows == (1, 1)
        (sy, sx), (rows, cols) = read_window(img.shape[:2], grid.window_origin(0, 0), tile)
        m = grid.margin_px
        x = hd.normalize(img)[:, sy.start + rows][:, :, sx.start + cols]
    out = hd.extract(
        img,
        tmp_path / "f.zarr",
        backbone=backbone,
        transforms=ts,
        tile=tile,
        client=local_client,
        progress=False,
        dtype="float32",
    )
    with torch.no_grad():
        whole = hd.highres_features(x, backbone, ts).numpy()
    if model == "vit":
        whole = whole[:, m : m + 280, m : m + 336]
    band = 21 + ts.max_shift_px  # 1.5 patches plus the largest shift
    inner = (slice(None), slice(band, 280 - band), slice(band, 336 - band))
    got, ref = out.values[inner], whole[inner]
    assert np.abs(got - ref).max() / np.abs(ref).max() < rtol
