"""``fidelity`` suite: how far bf16 autocast moves patch tokens and HR features from fp32.

For each image size (default 518 × 518 and 224 × 280), on a texture mosaic
(:func:`hrdv2_dask.data.texture_mosaic`, normalised as the pipeline does):

tokens
    the backbone's patch tokens ``(C, h, w)`` under bf16 autocast against fp32;
HR features
    :func:`hrdv2_dask.highres_features` with 9 views (identity and 1 px shifts) at
    ``precision="bf16"`` against ``precision="fp32"``.

Each reports the relative L2 error ``‖bf16 − fp32‖ / ‖fp32‖``, the largest error relative to the
fp32 map's RMS, and the mean and smallest cosine similarity between the two feature vectors of a
patch (tokens) or pixel (HR features).

The backbone is loaded from an official-format checkpoint (facebookresearch key names, including
``mask_token``) that the suite writes itself, through :func:`hrdv2_dask.load_backbone`'s real
loading path. Without ``--weights`` it holds timm's random initialisation of the architecture
with the layer-scale factors set to 0.5 ± 5 % instead of timm's 1e-5, so that every block
changes the tokens about as much as in trained DINOv2 (with 1e-5 the blocks are near-identity and
bf16 would look better than it is). With ``--weights`` the given checkpoint is used as it is.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

import hrdv2_dask as hd
from hrdv2_dask.data import texture_mosaic
from hrdv2_dask.precision import autocast, cpu_has_native_bf16

from .common import (
    BackboneSpec,
    Column,
    environment,
    environment_line,
    markdown_table,
    quiet_random_weights,
)

__all__ = ["add_arguments", "compare", "official_checkpoint", "run", "run_fidelity", "to_markdown"]

log = logging.getLogger(__name__)

SIZES = ((518, 518), (224, 280))
#: timm name -> official hub name, for the checkpoint the suite writes.
OFFICIAL_NAMES = {
    "vit_small_patch14_dinov2": "dinov2_vits14",
    "vit_base_patch14_dinov2": "dinov2_vitb14",
    "vit_large_patch14_dinov2": "dinov2_vitl14",
}


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Error of ``other`` against ``reference``, both ``(C, ...)`` feature maps.

    Returns
    -------
    dict
        ``rel_l2`` (‖other − reference‖ / ‖reference‖), ``max_rel`` (largest absolute error over
        the reference's RMS), ``cos_mean`` and ``cos_min`` (cosine similarity of the feature
        vectors, one per position).

    >>> a = torch.ones(4, 2, 2)
    >>> compare(a, a)["rel_l2"], compare(a, a)["cos_min"]
    (0.0, 1.0)
    """
    ref = reference.double().flatten(1)
    oth = other.double().flatten(1)
    diff = oth - ref
    rms = ref.pow(2).mean().sqrt()
    cos = torch.nn.functional.cosine_similarity(ref, oth, dim=0)
    return {
        "rel_l2": float(diff.norm() / ref.norm()),
        "max_rel": float(diff.abs().max() / rms),
        "cos_mean": round(float(cos.mean()), 12),
        "cos_min": round(float(cos.min()), 12),
    }


def official_checkpoint(spec: BackboneSpec, path: Path) -> tuple[str, Path]:
    """Write ``spec``'s random architecture as an official DINOv2 ``.pth``; ``(hub name, path)``.

    Layer-scale factors are drawn around 0.5 (see the module docstring); ``mask_token`` is added
    because official checkpoints have it.
    """
    import timm

    if spec.model not in OFFICIAL_NAMES:
        raise SystemExit(
            f"fidelity: no official name for {spec.model!r}; use one of "
            f"{', '.join(OFFICIAL_NAMES)} or pass --weights."
        )
    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    model = timm.create_model(spec.model, pretrained=False, **dict(spec.model_options))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k.endswith(".gamma"):
            sd[k] = 0.5 * (1 + 0.05 * torch.randn(v.shape, generator=g))
    sd["mask_token"] = torch.zeros(1, model.embed_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return OFFICIAL_NAMES[spec.model], path


def _image(shape: tuple[int, int], seed: int) -> torch.Tensor:
    mosaic, _ = texture_mosaic(max(shape), seed=seed)
    return hd.normalize(mosaic[: shape[0], : shape[1]])


def _tokens(backbone, image: torch.Tensor, precision: str) -> torch.Tensor:
    with torch.inference_mode(), autocast(precision, "cpu"):
        return backbone(image[None])[0].float()


def run_fidelity(
    *, spec: BackboneSpec, out_dir: str | Path, sizes: list[tuple[int, int]]
) -> dict[str, Any]:
    """Tokens and HR features in bf16 against fp32 at each size; the suite's result."""
    if spec.weights:
        name, weights = spec.model, Path(spec.weights)
    else:
        name, weights = official_checkpoint(spec, Path(out_dir) / "work" / "official_random.pth")
    with quiet_random_weights():
        backbone = hd.load_backbone(
            name, weights=str(weights), stride=spec.stride, device="cpu", **dict(spec.model_options)
        )
    rows = []
    for shape in sizes:
        image = _image(shape, spec.seed)
        log.info("fidelity: %d×%d", *shape)
        tok = compare(_tokens(backbone, image, "fp32"), _tokens(backbone, image, "bf16"))
        hr = [hd.highres_features(image, backbone, precision=p)[0] for p in ("fp32", "bf16")]
        feats = compare(*hr)
        rows.append(
            {"size": f"{shape[0]}×{shape[1]}"}
            | {f"tokens_{k}": v for k, v in tok.items()}
            | {f"hr_{k}": v for k, v in feats.items()}
        )
    return {
        "suite": "fidelity",
        "environment": environment("cpu", weights=str(spec.weights or "random, official format")),
        "settings": {
            "model": name,
            "model_label": spec.describe(),
            "checkpoint": str(weights),
            "random_layer_scale": None if spec.weights else "0.5 ± 5 %",
            "views": 9,
            "sizes": [list(s) for s in sizes],
            "bf16_native": cpu_has_native_bf16(),
        },
        "rows": rows,
    }


COLUMNS = [
    Column("size", "image"),
    Column("tokens_rel_l2", "tokens: rel. L2", "{:.2e}"),
    Column("tokens_max_rel", "tokens: max / RMS", "{:.2e}"),
    Column("tokens_cos_min", "tokens: min cosine", "{:.5f}"),
    Column("hr_rel_l2", "HR features: rel. L2", "{:.2e}"),
    Column("hr_max_rel", "HR: max / RMS", "{:.2e}"),
    Column("hr_cos_mean", "HR: mean cosine", "{:.6f}"),
    Column("hr_cos_min", "HR: min cosine", "{:.5f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    init = (
        f"random weights with layer scale {s['random_layer_scale']}, written as an "
        "official-format checkpoint and loaded through `load_backbone`"
        if s["random_layer_scale"]
        else f"checkpoint `{s['checkpoint']}`"
    )
    return "\n".join(
        [
            "### bf16 autocast against fp32 (CPU)",
            "",
            environment_line(result["environment"], speed_only=False),
            f"`{s['model']}`, {init}; texture mosaic; HR features with {s['views']} views "
            f"(identity + 1 px shifts). Native bf16 on this CPU: {s['bf16_native']}.",
            "",
            markdown_table(result["rows"], COLUMNS),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        help="image sizes as HxW, comma separated (default: 518x518,224x280)",
    )


def _parse_sizes(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return list(SIZES)
    out = []
    for item in text.split(","):
        h, _, w = item.strip().lower().partition("x")
        out.append((int(h), int(w or h)))
    return out


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    """Run the suite from parsed command-line arguments."""
    if spec.device.startswith("cuda"):
        log.warning("fidelity: measures the CPU's bf16 kernels; --device is ignored")
    return run_fidelity(spec=spec, out_dir=args.out, sizes=_parse_sizes(args.sizes))
