"""Backbones: checkpoint formats, official fidelity at any size, stride trick, weight lookup."""

from __future__ import annotations

import warnings

import pytest
import torch
from dinov2_reference import TINY, official_forward, official_to_hf, random_official_state_dict
from safetensors.torch import save_file

import hrdv2_dask as hd
from hrdv2_dask.backbones import model_spec, official_pos_embed

SIZES = [(518, 518), (224, 280), (70, 126), (98, 98)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    sd = random_official_state_dict(**{k: TINY[k] for k in ("embed_dim", "depth")}, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return sd, path


def _images(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *shape, generator=g)


@pytest.mark.parametrize("registers", [0, 4])
def test_official_pth_matches_reference_at_any_size(tmp_path, registers):
    sd = random_official_state_dict(
        **{k: TINY[k] for k in ("embed_dim", "depth")}, registers=registers, seed=2
    )
    path = tmp_path / (
        "dinov2_vits14_reg4_pretrain.pth" if registers else "dinov2_vits14_pretrain.pth"
    )
    torch.save(sd, path)
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    bb = hd.load_backbone(name, weights=path, **TINY)
    assert (bb.patch_size, bb.stride, bb.embed_dim) == (14, 14, 64)
    assert bb.weights_origin == str(path.resolve())
    for shape in SIZES:
        x = _images(shape)
        with torch.no_grad():
            ours = bb(x)
            ref = official_forward(sd, x, num_heads=TINY["num_heads"])
        assert ours.shape == (2, 64, shape[0] // 14, shape[1] // 14)
        assert rel_err(ours, ref) < 1e-4, shape


def test_swiglu_giant_layout(tmp_path):
    sd = random_official_state_dict(embed_dim=64, depth=2, swiglu=True, seed=3)
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(sd, path)
    hidden = sd["blocks.0.mlp.w12.weight"].shape[0]
    bb = hd.load_backbone("dinov2_vitg14", weights=path, **TINY, mlp_ratio=hidden / 64)
    x = _images((112, 84))
    with torch.no_grad():
        assert rel_err(bb(x), official_forward(sd, x, num_heads=4)) < 1e-4


@pytest.mark.parametrize("stride", [7, 2])
def test_stride_trick_matches_reference(official_ckpt, stride):
    sd, path = official_ckpt
    bb = hd.load_backbone("dinov2_vits14", weights=path, stride=stride, **TINY)
    x = _images((98, 126), n=1)
    with torch.no_grad():
        ours = bb(x)
        ref = official_forward(sd, x, num_heads=4, stride=stride)
    assert ours.shape[-2:] == ((98 - 14) // stride + 1, (126 - 14) // stride + 1)
    assert rel_err(ours, ref) < 1e-4


def test_official_rule_differs_from_size_based_resampling():
    """The 0.1 offset and no antialiasing matter: a size-based resample gives other embeddings."""
    pos = torch.randn(1, 37 * 37, 8).cumsum(1) / 100  # smooth-ish
    ours = official_pos_embed(pos, (16, 20))
    grid = pos.reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    size_based = torch.nn.functional.interpolate(
        grid, size=(16, 20), mode="bicubic", antialias=True
    )
    size_based = size_based.permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert rel_err(size_based, ours) > 1e-3
    assert official_pos_embed(pos, (37, 37)) is pos


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_roundtrip(official_ckpt, tmp_path, suffix):
    _, path = official_ckpt
    src = hd.load_backbone("dinov2_vits14", weights=path, **TINY)
    out = tmp_path / f"model{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(sd, out) if suffix == ".safetensors" else torch.save(sd, out)
    loaded = hd.load_backbone("vit_small_patch14_dinov2", weights=out, **TINY)
    x = _images((140, 112))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("registers", [0, 4])
def test_huggingface_dinov2model_safetensors(tmp_path, registers):
    transformers = pytest.importorskip("transformers")
    sd = random_official_state_dict(embed_dim=64, depth=2, registers=registers, seed=4)
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=518,
        patch_size=14,
        layer_norm_eps=1e-6,
    )
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        cls = transformers.Dinov2WithRegistersModel
    else:
        cfg, cls = transformers.Dinov2Config(**common), transformers.Dinov2Model
    # The file as published on the hub (classic key names), loaded by transformers itself.
    cfg.save_pretrained(tmp_path / "hf")
    save_file(
        {k: v.contiguous() for k, v in official_to_hf(sd).items()},
        tmp_path / "hf" / "model.safetensors",
    )
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    bb = hd.load_backbone(name, weights=tmp_path / "hf" / "model.safetensors", **TINY)
    x = _images((518, 518), n=1)
    with torch.no_grad():
        hf_tokens = hf(pixel_values=x).last_hidden_state[:, 1 + registers :]
        ours = bb(x)
    h = ours.shape[-1]
    assert rel_err(ours, hf_tokens.transpose(1, 2).reshape(1, 64, h, h)) < 1e-4
    # away from the native grid, transformers resamples by size; we keep the official rule
    x = _images((224, 280), n=1)
    with torch.no_grad():
        assert rel_err(bb(x), official_forward(sd, x, num_heads=4)) < 1e-4


def test_random_weights_warn_loudly():
    with pytest.warns(hd.RandomWeightsWarning, match="RANDOM WEIGHTS"):
        bb = hd.load_backbone("dinov2_vits14", weights="random", **TINY)
    assert bb.weights_origin == "random" and bb.random_weights


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    yield tmp_path
    torch.hub.set_dir(old)


def test_offline_without_weights_says_where_it_looked(empty_caches):
    with pytest.raises(hd.WeightsNotFoundError) as info:
        hd.load_backbone("dinov2_vits14", download=False, **TINY)
    msg = str(info.value)
    assert "dinov2_vits14_pretrain.pth" in msg
    assert str(empty_caches / "torch_hub") in msg
    assert "timm/vit_small_patch14_dinov2.lvd142m" in msg and "facebook/dinov2-small" in msg
    assert "weights=PATH" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_torch_hub_cache_is_used(empty_caches, official_ckpt):
    sd, _ = official_ckpt
    target = empty_caches / "torch_hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    target.parent.mkdir(parents=True)
    torch.save(sd, target)
    bb = hd.load_backbone("dinov2_vits14", download=False, **TINY)
    assert bb.weights_origin.startswith("torch-hub-cache:")
    x = _images((70, 84), n=1)
    with torch.no_grad():
        assert rel_err(bb(x), official_forward(sd, x, num_heads=4)) < 1e-4


def test_huggingface_cache_is_used(empty_caches, official_ckpt):
    _, path = official_ckpt
    src = hd.load_backbone("dinov2_vits14", weights=path, **TINY)
    repo = empty_caches / "hf_cache" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(
        {k: v.contiguous() for k, v in src.model.state_dict().items()}, snap / "model.safetensors"
    )
    bb = hd.load_backbone("dinov2_vits14", download=False, **TINY)
    assert bb.weights_origin == "hf-cache:timm/vit_small_patch14_dinov2.lvd142m"


def test_mismatched_checkpoint_is_a_clear_error(official_ckpt):
    _, path = official_ckpt
    with pytest.raises(hd.WeightsFormatError, match="shape mismatch|missing"):
        hd.load_backbone("dinov2_vits14", weights=path, embed_dim=96, depth=2, num_heads=4)


def test_missing_and_corrupt_weight_files(tmp_path):
    with pytest.raises(hd.WeightsNotFoundError, match="does not exist"):
        hd.load_backbone("dinov2_vits14", weights=tmp_path / "nope.pth", **TINY)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(hd.WeightsFormatError, match="Cannot read checkpoint"):
        hd.load_backbone("dinov2_vits14", weights=bad, **TINY)


def test_names():
    assert model_spec("dinov2_vitb14_reg").timm_name == "vit_base_patch14_reg4_dinov2"
    assert model_spec("dinov2_vitl14").official_file == "dinov2_vitl14_pretrain.pth"
    assert model_spec("vit_small_patch14_dinov2.lvd142m").hub_name == "dinov2_vits14"
    assert model_spec("dinov3_vits16").timm_name == "vit_small_patch16_dinov3"
    with pytest.raises(hd.ConfigError, match="Unknown backbone"):
        model_spec("dinov9_huge")


def test_bad_stride_and_input_size():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        with pytest.raises(hd.ConfigError, match="divide"):
            hd.load_backbone("dinov2_vits14", weights="random", stride=5, **TINY)
        bb = hd.load_backbone("dinov2_vits14", weights="random", **TINY)
    with pytest.raises(hd.InputError, match="Pad it to 28x42"):
        bb(torch.zeros(1, 3, 20, 30))


def test_dinov3_rope_backbone_runs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        bb = hd.load_backbone("dinov3_vits16", weights="random", embed_dim=64, depth=1, num_heads=4)
    assert bb.patch_size == 16
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 64, 4, 6)
    with pytest.raises(hd.ConfigError, match="rotary"):
        hd.backbones.Backbone(bb.model, name="dinov3_vits16", stride=8)
