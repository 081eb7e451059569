"""The HR-Dv2 ensemble: geometry (ramp), literal recipe, naive reference, memory, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hrdv2_dask as hd
from hrdv2_dask.transforms import grid_coords, pad_reflect

SETS = {
    "shifts": hd.shifts((1, 2, 3)),
    "flips": hd.flips(),
    "shifts+flips": hd.combine(hd.shifts((1, 2)), hd.flips()),
    "shifts+flips+rotations": hd.combine(hd.shifts(), hd.flips(), hd.rotations()),
}


def _ramp(h, w, axis):
    r = torch.arange(w if axis == 1 else h, dtype=torch.float32)
    r = r[None, :] if axis == 1 else r[:, None]
    return r.expand(h, w)[None].expand(3, h, w).clone()


@pytest.mark.parametrize("stride", [14, 7])
@pytest.mark.parametrize("name", sorted(SETS))
@pytest.mark.parametrize("axis", [0, 1])
def test_ramp_comes_back(stride, name, axis):
    """I = x (or y) through MeanPool comes back as the ramp in the interior, to 1e-3 px."""
    h, w = 101, 131  # not multiples of the patch size: padding and cropping are exercised
    img = _ramp(h, w, axis)
    ts = SETS[name]
    out = hd.highres_features(img, hd.MeanPool(14, stride), ts)
    assert out.shape == (3, h, w)
    # Patches that see reflected pixels spoil 1.5 patches plus the largest shift at the border,
    # and the bottom/right padding on top of that.
    b = 21 + ts.max_shift_px
    pad = [hd.backbones.valid_size(n, 14, stride) - n for n in (h, w)]
    inner = (slice(None), slice(b, h - b - pad[0]), slice(b, w - b - pad[1]))
    err = (out[inner] - img[inner]).abs().max()
    assert float(err) < 1e-3


@pytest.mark.parametrize("out_stride", [2, 3, 7, 14])
def test_ramp_at_coarser_output_grids(out_stride):
    h, w = 70, 98
    out = hd.highres_features(
        _ramp(h, w, 1), hd.MeanPool(14, 7), SETS["shifts+flips"], out_stride=out_stride
    )
    assert out.shape == (3, -(-h // out_stride), -(-w // out_stride))
    centres = torch.from_numpy(grid_coords(w, out_stride)).float()
    band = 21 + 2
    inner = (centres > band) & (centres < w - band - 14)
    b = -(-band // out_stride)
    assert float((out[0, b:-b][:, inner] - centres[inner]).abs().max()) < 1e-3


def test_periodic_equals_the_literal_recipe(tiny_random_dinov2):
    """roll → backbone → bilinear resize → roll back → mean, within 1e-4."""
    bb = tiny_random_dinov2
    x = torch.randn(2, 3, 84, 112, generator=torch.Generator().manual_seed(0))
    ts = hd.shifts((1, 3), "moore", boundary="periodic")
    with torch.no_grad():
        literal = torch.zeros(2, 64, 84, 112)
        for t in ts:
            d = (t.steps[0].dy, t.steps[0].dx) if t.steps else (0, 0)
            f = bb(torch.roll(x, d, dims=(-2, -1)))
            up = F.interpolate(f, size=(84, 112), mode="bilinear", align_corners=False)
            literal += torch.roll(up, (-d[0], -d[1]), dims=(-2, -1))
        literal /= len(ts)
    ours = hd.highres_features(x, bb, ts, precision="fp32")  # the literal recipe runs fp32
    assert float((ours - literal).abs().max() / literal.abs().max()) < 1e-4


def _upsample_reference(f: torch.Tensor, shape, patch: int, stride: int) -> torch.Tensor:
    """Resize (C, h, w) to the pixel grid with grid_sample, patch centres at i*S + (P-1)/2."""
    h, w = f.shape[-2:]

    def norm(n_px, n):
        t = (torch.arange(n_px, dtype=torch.float64) - (patch - 1) / 2) / stride
        return (2 * t.clamp(0, n - 1) / max(n - 1, 1) - 1).float()

    gy, gx = torch.meshgrid(norm(shape[0], h), norm(shape[1], w), indexing="ij")
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(f[None], grid, mode="bilinear", align_corners=True)[0]


def naive_ensemble(img: torch.Tensor, bb, ts) -> torch.Tensor:
    """Pad, transform, run, resize each view to its pixel grid, undo on pixels, stack, mean."""
    p, s = bb.patch_size, bb.stride
    h, w = img.shape[-2:]
    padded_shape = tuple(hd.backbones.valid_size(n, p, s) for n in (h, w))
    padded = pad_reflect(img, padded_shape)
    maps = []
    with torch.no_grad():
        for t in ts:
            view = t.apply(padded)
            f = bb(view[None])[0]
            up = _upsample_reference(f, view.shape[-2:], p, s)
            maps.append(t.inverse().apply(up)[:, :h, :w])
    return torch.stack(maps).mean(0)


@pytest.mark.parametrize("stride", [14, 7])
def test_matches_naive_reference(tiny_random_dinov2, stride):
    bb = hd.backbones.Backbone(tiny_random_dinov2.model, name="tiny", stride=stride)
    img = torch.randn(3, 37, 47, generator=torch.Generator().manual_seed(1))
    ts = hd.combine(hd.shifts((1, 2)), hd.flips(), hd.rotations())
    ours = hd.highres_features(img, bb, ts, precision="fp32")  # exactness: fp32 like the naive
    ref = naive_ensemble(img, bb, ts)
    b = 2  # the naive inverse of a reflected shift is inexact within the shift of the border
    diff = (ours - ref)[:, b:-b, b:-b].abs().max() / ref.abs().max()
    assert float(diff) < 1e-5


def test_flips_and_rotations_match_naive_everywhere(tiny_random_dinov2):
    img = torch.randn(3, 50, 66, generator=torch.Generator().manual_seed(2))
    ts = hd.combine(hd.flips(), hd.rotations())
    ours = hd.highres_features(img, tiny_random_dinov2, ts, precision="fp32")
    ref = naive_ensemble(img, tiny_random_dinov2, ts)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5


def test_any_size_and_batch_independence(tiny_random_dinov2):
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(3, 3, 53, 71, generator=g)
    ts = hd.combine(hd.shifts(), hd.flips())
    together = hd.highres_features(batch, tiny_random_dinov2, ts, batch_size=7)
    assert together.shape == (3, 64, 53, 71)
    for i in range(3):
        alone = hd.highres_features(batch[i], tiny_random_dinov2, ts)
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
    strided = hd.highres_features(batch, tiny_random_dinov2, ts, out_stride=3)
    assert strided.shape == (3, 64, 18, 24)


def test_deterministic(tiny_random_dinov2):
    x = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(4))
    a = hd.highres_features(x, tiny_random_dinov2, hd.shifts((1, 2)))
    b = hd.highres_features(x, tiny_random_dinov2, hd.shifts((1, 2)))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda bb: hd.highres_features(np.zeros((3, 28, 28)), bb), hd.InputError),
        (lambda bb: hd.highres_features(torch.zeros(1, 1, 28, 28), bb), hd.InputError),
        (lambda bb: hd.highres_features(torch.zeros(3, 28, 28), bb, out_stride=0), hd.ConfigError),
        (lambda bb: hd.highres_features(torch.zeros(3, 28, 28), bb, batch_size=0), hd.ConfigError),
        (
            lambda bb: hd.highres_features(
                torch.zeros(3, 28, 28), hd.MeanPool(8, 8), hd.shifts(5, patch_size=14)
            ),
            hd.ConfigError,
        ),
    ],
)
def test_bad_arguments(call, exc):
    with pytest.raises(exc):
        call(hd.MeanPool())


def test_peak_memory_17_views_within_3x_of_1():
    """384 channels at 518² (an output map is 412 MB): memory must not grow with the views."""
    from benchmarks.common import BackboneSpec, run_isolated
    from benchmarks.core import probe_memory

    spec = BackboneSpec(model_options=(("depth", 1),))
    peaks = {
        n: run_isolated(
            probe_memory, spec=spec, size=518, n_views=n, methods=["ensemble"], batch_size=4
        )["ensemble"]["host_bytes"]
        for n in (1, 17)
    }
    output_bytes = 384 * 518 * 518 * 4
    assert peaks[17] < 3 * peaks[1]
    assert peaks[17] < 3 * output_bytes


@pytest.mark.parametrize("out_stride", [1, 3])
@pytest.mark.parametrize("name", sorted(SETS))
def test_fused_resample_equals_gather_reference(tiny_random_dinov2, name, out_stride):
    img = torch.randn(2, 3, 45, 60, generator=torch.Generator().manual_seed(5))
    kw = dict(out_stride=out_stride, batch_size=3)
    fused = hd.highres_features(img, tiny_random_dinov2, SETS[name], fused=True, **kw)
    gather = hd.highres_features(img, tiny_random_dinov2, SETS[name], fused=False, **kw)
    assert float((fused - gather).abs().max() / gather.abs().max()) < 1e-5


def test_bf16_gemm_branch_equals_reference_to_bf16_rounding(tiny_random_dinov2, monkeypatch):
    """The GPU's x pass (bf16 operands, fp32 accumulation, channel chunks), run on the CPU:
    the branch no CPU run takes otherwise."""
    from hrdv2_dask import ensemble

    img = torch.randn(2, 3, 45, 60, generator=torch.Generator().manual_seed(5))
    ts = SETS["shifts+flips+rotations"]
    gather = hd.highres_features(img, tiny_random_dinov2, ts, fused=False, batch_size=3)
    monkeypatch.setattr(ensemble, "_BF16_GEMM_DEVICES", ("cpu",))
    # chunks of a few channels: 64 channels x 45 x 60 output in several matrix products
    monkeypatch.setattr(ensemble, "_X_PASS_BYTES", 45 * 60 * 2 * 5)
    bf16 = hd.highres_features(img, tiny_random_dinov2, ts, fused=True, batch_size=3)
    assert bf16.dtype == torch.float32 and bf16.shape == gather.shape
    err = float((bf16 - gather).abs().max() / gather.abs().max())
    assert 1e-6 < err < 1e-2  # bf16 rounding of the operands, nothing worse


@pytest.mark.parametrize("fused", [True, False])
def test_linear_head_first_equals_head_after(tiny_random_dinov2, fused):
    """Resample, invert and average are linear and keep constants: an affine head commutes."""
    g = torch.Generator().manual_seed(6)
    img = torch.randn(2, 3, 56, 70, generator=g)
    ts = hd.combine(hd.shifts((1, 2)), hd.flips(), hd.rotations())
    head = hd.LinearHead.from_pca(
        torch.randn(64, generator=g).numpy(), torch.randn(5, 64, generator=g).numpy()
    )
    first = hd.highres_features(img, tiny_random_dinov2, ts, head=head, fused=fused)
    full = hd.highres_features(img, tiny_random_dinov2, ts, fused=fused)
    after = head.apply(full)
    assert first.shape == (2, 5, 56, 70)
    assert float((first - after).abs().max() / after.abs().max()) < 1e-5


def test_token_bias_removes_the_mean_pattern_exactly(tiny_random_dinov2):
    """Debiased with the bias of the same windows, their mean map is flat per channel."""
    windows = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    ts = hd.shifts()
    bias = hd.position_bias(windows, tiny_random_dinov2, ts)
    assert len(bias) == len(ts) and bias[0].shape == (64, 4, 4)
    assert float(bias[0].mean(dim=(1, 2)).abs().max()) < 1e-5  # the overall mean is kept
    plain = hd.highres_features(windows, tiny_random_dinov2, ts).mean(0)
    clean = hd.highres_features(windows, tiny_random_dinov2, ts, token_bias=bias).mean(0)
    spread = clean.amax(dim=(1, 2)) - clean.amin(dim=(1, 2))
    assert float(spread.max()) < 1e-4 * float(plain.abs().max())
    # plain features do carry a within-window pattern, so the test can fail
    assert float((plain.amax(dim=(1, 2)) - plain.amin(dim=(1, 2))).max()) > 0.1


def test_head_and_bias_errors(tiny_random_dinov2):
    img = torch.zeros(3, 28, 28)
    with pytest.raises(hd.ConfigError, match="64 channels"):
        hd.highres_features(img, tiny_random_dinov2, head=hd.LinearHead(np.ones((2, 3))))
    with pytest.raises(hd.ConfigError, match="9 transforms"):
        hd.highres_features(img, tiny_random_dinov2, token_bias=[np.zeros((64, 2, 2))])
    with pytest.raises(hd.ConfigError, match="C = 64 channels"):
        hd.highres_features(img, tiny_random_dinov2, token_bias=[np.zeros((3, 2, 2))] * 9)
    with pytest.raises(hd.ConfigError, match="bias must have shape"):
        hd.LinearHead(np.ones((2, 3)), np.ones(3))
