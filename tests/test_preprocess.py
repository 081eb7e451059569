"""normalize: dtypes, layouts, channels, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hrdv2_dask as hd
from hrdv2_dask.preprocess import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.mark.parametrize(
    "image, expected01",
    [
        (np.full((4, 5), 255, np.uint8), 1.0),
        (np.full((4, 5), 0, np.uint8), 0.0),
        (np.full((4, 5), 65535 // 5, np.uint16), 0.2),
        (np.full((4, 5), 0.25, np.float32), 0.25),
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
        (np.zeros((4, 5), np.int32), "dtype"),
    ],
)
def test_bad_images_raise_value_error(image, match):
    with pytest.raises(ValueError, match=match) as info:
        hd.normalize(image)
    assert isinstance(info.value, hd.InputError)
