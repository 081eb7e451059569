"""Backbone outputs: layers, key/query/value facets, CLS attention, the filter bank, precision."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage.feature import multiscale_basic_features

import hrdv2_dask as hd
from hrdv2_dask.backbones import Backbone
from hrdv2_dask.errors import ConfigError
from hrdv2_dask.filterbank import FilterBank
from hrdv2_dask.precision import cpu_has_native_bf16, recorded_precision, resolve_precision


@pytest.fixture(scope="module")
def tiny():
    """A 3-block DINOv2 ViT-S/14 (64 wide, 4 heads, 4 registers) at its native 56 px size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        torch.manual_seed(0)
        return hd.load_backbone(
            "dinov2_vits14_reg", weights="random", embed_dim=64, depth=3, num_heads=4, img_size=56
        )


def _reference(model, x, layer):
    """From timm's own forward at the native size: hooks on block ``layer``'s qkv and output."""
    seen = {}
    blk = model.blocks[layer]
    h1 = blk.attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
    h2 = blk.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad():
        model.forward_features(x)
    h1.remove()
    h2.remove()
    d = model.embed_dim
    q, k, v = seen["qkv"][..., :d], seen["qkv"][..., d : 2 * d], seen["qkv"][..., 2 * d :]
    heads = blk.attn.num_heads
    qh = q.reshape(*q.shape[:2], heads, -1).transpose(1, 2)
    kh = k.reshape(*k.shape[:2], heads, -1).transpose(1, 2)
    att = torch.softmax(qh[:, :, :1] @ kh.transpose(-2, -1) / qh.shape[-1] ** 0.5, dim=-1)
    return {"key": k, "query": q, "value": v, "token": seen["out"], "attention": att[:, :, 0]}


def _as_tokens(fmap):  # (B, C, h, w) -> (B, h*w, C)
    return fmap.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("layer", [0, 1, -1])
@pytest.mark.parametrize("facet", ["key", "query", "value"])
def test_facets_equal_the_blocks_qkv(tiny, layer, facet):
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    ref = _reference(tiny.model, x, layer)
    n_pre = tiny.num_prefix_tokens  # class + 4 registers, excluded
    bb = Backbone(tiny.model, name="t", layer=layer, facet=facet)
    with torch.no_grad():
        got = bb(x)
    assert got.shape == (2, 64, 4, 4) and bb.embed_dim == 64
    torch.testing.assert_close(_as_tokens(got), ref[facet][:, n_pre:], rtol=1e-5, atol=1e-5)


def test_attention_is_the_cls_softmax_per_head(tiny):
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    ref = _reference(tiny.model, x, 1)
    n_pre = tiny.num_prefix_tokens
    only = Backbone(tiny.model, name="t", layer=1, attention="only")
    app = Backbone(tiny.model, name="t", layer=1, facet="key", attention="append")
    with torch.no_grad():
        a, b = only(x), app(x)
    assert only.embed_dim == 4 and a.shape == (1, 4, 4, 4)
    torch.testing.assert_close(_as_tokens(a), ref["attention"][:, :, n_pre:].transpose(1, 2))
    # the patches' share of the attention: below 1 because the prefix tokens take the rest
    assert float(a.sum(dim=(2, 3)).max()) < 1
    assert app.embed_dim == 68
    torch.testing.assert_close(b[:, 64:], a)
    torch.testing.assert_close(_as_tokens(b[:, :64]), ref["key"][:, n_pre:], rtol=1e-5, atol=1e-5)


def test_intermediate_token_is_the_block_output(tiny):
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    ref = _reference(tiny.model, x, 1)
    with torch.no_grad():
        got = Backbone(tiny.model, name="t", layer=-2)(x)
    torch.testing.assert_close(_as_tokens(got), ref["token"][:, 5:], rtol=1e-5, atol=1e-5)


def test_last_token_is_todays_output_bit_for_bit(tiny):
    x = torch.randn(2, 3, 70, 84, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        today = tiny(x)
        for layer in (-1, 2):
            bb = Backbone(tiny.model, name="t", layer=layer)
            assert bb.options == {}
            assert torch.equal(bb(x), today)


def test_bad_layer_and_facet_are_clear():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        with pytest.raises(ConfigError, match=r"layer must be a block index in -2\.\.1"):
            hd.load_backbone("dinov2_vits14", weights="random", depth=2, embed_dim=48, layer=2)
        with pytest.raises(ConfigError, match="attention='only'"):
            hd.load_backbone(
                "dinov2_vits14", weights="random", depth=2, embed_dim=48, facet="key",
                attention="only",
            )  # fmt: skip
    with pytest.raises(ConfigError, match="facet"):
        hd.FeatureSettings(facet="keys")


def test_extract_records_the_choice_and_refuses_it_for_objects(tmp_path, local_client):
    img = (np.random.default_rng(0).random((84, 98, 3)) * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        out = hd.extract(
            img, tmp_path / "k.zarr", backbone="dinov2_vits14", weights="random",
            client=local_client,
            model_options={"depth": 2, "embed_dim": 32, "num_heads": 2}, layer=0, facet="key",
            attention="append", tile=112, progress=False, precision="fp32", dtype="float32",
        )  # fmt: skip
        assert out.sizes["feature"] == 34
        assert {k: out.attrs[k] for k in ("layer", "facet", "attention")} == {
            "layer": 0,
            "facet": "key",
            "attention": "append",
        }
        assert "precision" not in out.attrs  # fp32 on a CPU: the legacy rule, not recorded
        with pytest.raises(ConfigError, match="apply to a backbone given by name"):
            hd.extract(
                img, tmp_path / "m.zarr", backbone=hd.MeanPool(), layer=1, client=local_client
            )


# --- the filter bank ------------------------------------------------------------------------


def test_filterbank_is_skimages_features():
    fb = FilterBank(sigma_max=4)
    x = torch.randn(2, 3, 40, 50, generator=torch.Generator().manual_seed(5))
    got = fb(x)
    ref = multiscale_basic_features(x[1].permute(1, 2, 0).numpy(), sigma_max=4, channel_axis=-1)
    assert got.shape == (2, 48, 40, 50) == (2, fb.embed_dim, 40, 50)
    np.testing.assert_array_equal(got[1].permute(1, 2, 0).numpy(), ref)
    assert fb.channel_names[4] == "c0_intensity_s1" and len(fb.channel_names) == 48


def test_filterbank_tiled_equals_whole(tmp_path, local_client):
    rng = np.random.default_rng(0)
    img = (rng.random((150, 170, 3)) * 255).astype(np.uint8)
    opts = dict(backbone="filterbank", model_options={"sigma_max": 4}, client=local_client)
    opts.update(progress=False, dtype="float32", precision="fp32")
    tiled = hd.extract(img, tmp_path / "t.zarr", tile=64, **opts)
    assert tiled.attrs["transforms"] == ["identity"] and tiled.attrs["model"] == "filterbank"
    assert tiled.attrs["channel_names"][:2] == ["c0_intensity_s0.5", "c0_edges_s0.5"]
    # the whole image, mirrored at the border as the windows are, through the filter bank at once
    fb = FilterBank(sigma_max=4)
    m = tiled.attrs["margin_px"]
    x = hd.normalize(np.pad(img, ((m, m), (m, m), (0, 0)), mode="reflect"))
    whole = fb(x[None])[0, :, m:-m, m:-m].numpy()
    np.testing.assert_allclose(tiled.values, whole, rtol=0, atol=2e-6)
    assert tiled.sizes["feature"] == 48


def test_filterbank_refuses_what_it_does_not_have():
    with pytest.raises(ConfigError, match="filterbank has no weights"):
        hd.load_backbone("filterbank", weights="x.pth")
    with pytest.raises(ConfigError, match="no transformer layers"):
        hd.load_backbone("filterbank", facet="key")
    with pytest.raises(ConfigError, match="filterbank options are"):
        hd.load_backbone("filterbank", depth=2)


# --- precision ------------------------------------------------------------------------------


def test_native_bf16_follows_the_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() == native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", "cuda") == "bf16"
    # recorded only where it differs from the rule before the option (bf16 GPU, fp32 CPU)
    assert recorded_precision("auto", "cuda") == ("bf16", None)
    assert recorded_precision("fp32", "cuda") == ("fp32", "fp32")
    assert recorded_precision("auto", "cpu") == ("bf16", "bf16") if native else ("fp32", None)


def test_bf16_autocast_is_close_to_fp32(tiny_random_dinov2):
    x = torch.randn(1, 3, 70, 70, generator=torch.Generator().manual_seed(6))
    a = hd.highres_features(x, tiny_random_dinov2, precision="fp32")
    b = hd.highres_features(x, tiny_random_dinov2, precision="bf16")
    rel = float((a - b).norm() / a.norm())
    assert b.dtype == torch.float32 and 0 < rel < 0.05
