"""Transforms: exact inverses, coordinate maps that agree with the image ops, set algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hrdv2_dask as hd
from hrdv2_dask.transforms import AxisCoords, Compose, Flip, Rotate, Shift, pad_reflect

ALL_SETS = {
    "shifts": hd.shifts((1, 2, 3)),
    "periodic": hd.shifts((1, 6), boundary="periodic"),
    "von_neumann": hd.shifts(2, "von_neumann"),
    "flips": hd.flips(),
    "rotations": hd.rotations(),
    "shift+flip": hd.combine(hd.shifts((1, 2)), hd.flips()),
    "shift+flip+rot": hd.combine(hd.shifts(), hd.flips(), hd.rotations()),
}


def _image(h=23, w=31, c=2, seed=0):
    return torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _border(t) -> int:
    """Reflected shifts are exact inverses only this far from the border."""
    return max(
        (s.max_shift_px for s in t.steps if getattr(s, "boundary", "") == "reflect"), default=0
    )


@pytest.mark.parametrize("name", sorted(ALL_SETS))
def test_every_transform_inverts_exactly(name):
    x = _image()
    for t in ALL_SETS[name]:
        back = t.inverse().apply(t.apply(x))
        b = _border(t)
        assert back.shape == x.shape
        assert torch.equal(
            back[:, b : x.shape[1] - b, b : x.shape[2] - b],
            x[:, b : x.shape[1] - b, b : x.shape[2] - b],
        ), str(t)


@pytest.mark.parametrize("name", sorted(ALL_SETS))
def test_map_coords_agrees_with_the_image_op(name):
    """Pixel p of the original lands at map_coords(p) in the transformed image."""
    h, w = 23, 31
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    coords_img = torch.stack([yy, xx])
    for t in ALL_SETS[name]:
        moved = t.apply(coords_img)
        assert tuple(moved.shape[1:]) == t.output_shape((h, w))
        cy, cx = t.map_coords(
            (AxisCoords(0, np.arange(h, dtype=float)), AxisCoords(1, np.arange(w, dtype=float))),
            (h, w),
        )
        assert {cy.axis, cx.axis} == {0, 1}
        b = _border(t)
        ys, xs = np.arange(b, h - b), np.arange(b, w - b)
        # Position in the transformed image of every interior pixel (y, x).
        pos = [None, None]
        pos[cy.axis] = cy.values[ys][:, None].repeat(len(xs), 1)
        pos[cx.axis] = cx.values[xs][None, :].repeat(len(ys), 0)
        got = moved[:, pos[0].astype(int), pos[1].astype(int)]
        assert torch.equal(got[0], yy[b : h - b, b : w - b]), str(t)
        assert torch.equal(got[1], xx[b : h - b, b : w - b]), str(t)


@st.composite
def transform_strategy(draw):
    # One boundary rule per composition: a periodic roll after a reflected shift would carry
    # the reflected (inexact) border into the interior, and shifts() never mixes the two.
    boundary = draw(st.sampled_from(["reflect", "periodic"]))
    step = st.one_of(
        st.builds(Shift, st.integers(-6, 6), st.integers(-6, 6), st.just(boundary)),
        st.builds(Flip, st.sampled_from(["y", "x"])),
        st.builds(Rotate, st.integers(1, 3)),
    )
    return Compose(tuple(draw(st.lists(step, max_size=4))))


@settings(max_examples=60, deadline=None)
@given(t=transform_strategy(), h=st.integers(8, 20), w=st.integers(8, 20))
def test_inverse_of_random_compositions(t, h, w):
    x = _image(h, w, c=1)
    back = t.inverse().apply(t.apply(x))
    reflect_total = sum(s.max_shift_px for s in t.steps if getattr(s, "boundary", "") == "reflect")
    b = reflect_total
    if 2 * b < min(h, w):
        assert torch.equal(back[:, b : h - b, b : w - b], x[:, b : h - b, b : w - b])


def test_counts_identity_once_and_dedupes():
    assert len(hd.shifts()) == 9 and len(hd.shifts((1, 2))) == 17
    assert len(hd.shifts(1, "von_neumann")) == 5
    assert hd.shifts()[0] == Compose()
    assert len(hd.combine(hd.flips(), hd.rotations())) == 8  # dihedral group of the square
    assert len(hd.combine(hd.flips(), hd.flips())) == 4  # identity, x, y, and both (= half turn)
    assert len(hd.combine(hd.shifts(), hd.flips())) == 27
    ts = hd.TransformSet([Shift(0, 0), Rotate(2), Compose((Flip("x"), Flip("y")))])
    assert len(ts) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(magnitudes=(7,)),
        dict(magnitudes=(0,)),
        dict(magnitudes=(1.5,)),
        dict(neighbourhood="hex"),
        dict(magnitudes=()),
    ],
)
def test_bad_shift_options(kwargs):
    with pytest.raises(hd.ConfigError):
        hd.shifts(**kwargs)


def test_dinov3_patch_allows_larger_shifts():
    assert hd.shifts((7,), patch_size=16).max_shift_px == 7


def test_pad_reflect_any_amount():
    x = torch.arange(3.0).reshape(1, 1, 3)
    assert pad_reflect(x, (1, 8)).flatten().tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    y = torch.randn(2, 3, 10, 12)
    assert torch.equal(
        pad_reflect(y, (14, 14)), torch.nn.functional.pad(y, (0, 2, 0, 4), mode="reflect")
    )
