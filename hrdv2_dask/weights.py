"""Find backbone weights and convert checkpoints to timm's layout.

Resolution order (:func:`resolve_weights`): an explicit file, then the torch-hub cache (official
``.pth``), then the Hugging Face cache (timm, then transformers repositories), then a download
from the Hugging Face hub or the official URL. Checkpoint formats (:func:`to_timm_state_dict`):

- official facebookresearch DINOv2 (``cls_token``, ``pos_embed`` with the class position,
  ``register_tokens``, ``mask_token``, ``blocks.N.mlp.w12`` for SwiGLU), converted by timm's
  own DINOv2 rule (``_convert_dinov2``, the core of ``checkpoint_filter_fn``);
- timm (loaded as is);
- Hugging Face transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``embeddings.*``,
  ``encoder.layer.N.*``, optionally under ``dinov2.``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsFormatError, WeightsNotFoundError

__all__ = ["load_state_dict", "read_checkpoint", "resolve_weights", "to_timm_state_dict"]

log = logging.getLogger(__name__)

_HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors``, ``.pth``/``.pt``/``.bin`` checkpoint into a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - many libraries, one message
        raise WeightsFormatError(
            f"Cannot read checkpoint {str(path)!r}: {err}. Expected a .pth/.pt/.bin written by "
            "torch.save or a .safetensors file."
        ) from err
    for key in ("model", "state_dict", "teacher", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsFormatError(
            f"Checkpoint {str(path)!r} holds a {type(sd).__name__}, not a state dict."
        )
    return dict(sd)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "backbone.", "dinov2."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


_HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
]
_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$"
)
_HF_GATE_UP = re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$")


def _hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face ``Dinov2Model`` keys to the official DINOv2 layout."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    gate_up: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := _HF_QKV.match(key):
            qkv.setdefault((m[1], m[3]), {})[m[2][0]] = value
            continue
        if m := _HF_GATE_UP.match(key):
            gate_up.setdefault((m[1], m[3]), {})[m[2].split("_")[0]] = value
            continue
        for pattern, repl in _HF_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for (layer, kind), parts in gate_up.items():
        out[f"blocks.{layer}.mlp.w12.{kind}"] = torch.cat([parts["gate"], parts["up"]])
    return out


def _official_to_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename official DINOv2 keys to timm's with timm's own ``_convert_dinov2``.

    That is the DINOv2 branch of ``timm.models.vision_transformer.checkpoint_filter_fn``: it
    drops ``mask_token``, renames ``register_tokens``, ``mlp.w12``/``mlp.w3`` and folds the class
    position into ``cls_token`` for register models (timm builds those ``no_embed_class``).
    """
    from timm.models.vision_transformer import _convert_dinov2

    # Ours: timm's filter has no rule for block-chunked training checkpoints (blocks.<chunk>.<i>).
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    # Not the whole filter: it resamples pos_embed/patch kernel by timm's rule (ours: at run time).
    return _convert_dinov2(dict(sd), model)  # dict(): timm pops keys from its input


def to_timm_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a checkpoint in any supported layout to ``model``'s timm layout."""
    sd = _strip_prefixes(sd)
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        sd = _official_to_timm(_hf_to_official(sd), model)
    elif "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd):
        sd = _official_to_timm(sd, model)
    return sd


def load_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into the timm ``model``, converting its layout.

    Raises
    ------
    WeightsFormatError
        Keys or shapes do not match the architecture; the message lists the first mismatches.
    """
    sd = to_timm_state_dict(read_checkpoint(path), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.startswith("head."))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        if wrong:
            details.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in wrong[:3]
                )
            )
        arch = f"embed_dim={getattr(model, 'embed_dim', '?')}, depth={len(model.blocks)}"
        raise WeightsFormatError(
            f"Checkpoint {str(path)!r} does not fit {type(model).__name__} ({arch}): "
            + "; ".join(details)
            + ". Check that the model name matches the checkpoint (e.g. dinov2_vitb14 for a "
            "ViT-B/14 file, *_reg for register checkpoints)."
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached_hf_file(repo: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for fname in _HF_FILES:
        found = try_to_load_from_cache(repo, fname)
        if isinstance(found, str):
            return found
    return None


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the host of ``url`` answers a TCP connection quickly (skip retries offline)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _download(spec, tried: list[str]) -> tuple[str, str] | None:
    from huggingface_hub import constants

    if spec.timm_repo and not _reachable(constants.ENDPOINT):
        tried.append(f"download from {constants.ENDPOINT}: not reachable (offline?)")
    elif spec.timm_repo:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(spec.timm_repo, "model.safetensors")
            return path, f"hf-hub:{spec.timm_repo}"
        except Exception as err:  # noqa: BLE001 - offline, gated, missing: all mean "not here"
            tried.append(
                f"download from the Hugging Face hub ({spec.timm_repo}): {type(err).__name__}"
            )
    if spec.official_url and not _reachable(spec.official_url):
        tried.append(f"download {spec.official_url}: not reachable (offline?)")
    elif spec.official_url:
        try:
            target = _torch_hub_dir() / spec.official_file
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.official_url, str(target), progress=True)
            return str(target), spec.official_url
        except Exception as err:  # noqa: BLE001
            tried.append(f"download {spec.official_url}: {type(err).__name__}")
    return None


def resolve_weights(
    spec, weights: str | os.PathLike | None, *, download: bool = True
) -> tuple[str, str]:
    """Find the checkpoint for ``spec``.

    Returns
    -------
    path, origin : str
        A local file and a description of where it came from (recorded in outputs).

    Raises
    ------
    WeightsNotFoundError
        With every place that was looked in and how to provide weights.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"Weights file {str(path)!r} does not exist. Pass the path of a DINOv2 checkpoint "
                "(.pth or .safetensors), or weights=None to use the caches."
            )
        return str(path), str(path.resolve())
    tried: list[str] = []
    if spec.official_file:
        candidate = _torch_hub_dir() / spec.official_file
        if candidate.is_file():
            return str(candidate), f"torch-hub-cache:{candidate}"
        tried.append(f"torch hub cache {candidate}")
    for repo in (spec.timm_repo, spec.hf_repo):
        if repo:
            found = _cached_hf_file(repo)
            if found:
                return found, f"hf-cache:{repo}"
            tried.append(f"Hugging Face cache for {repo}")
    if download:
        got = _download(spec, tried)
        if got:
            return got
    else:
        tried.append("no download (download=False)")
    hub_file = spec.official_file or "<checkpoint>.pth"
    raise WeightsNotFoundError(
        f"No weights found for {spec.hub_name or spec.timm_name}. Looked in: "
        + "; ".join(tried)
        + f". Fix: pass weights=PATH (CLI: --weights PATH) to an official {hub_file}, a timm "
        "model.safetensors or a Hugging Face Dinov2Model model.safetensors; or copy "
        f"{hub_file} into {_torch_hub_dir()}; or run once with internet access to fill the "
        "cache. For tests only, weights='random'."
    )
