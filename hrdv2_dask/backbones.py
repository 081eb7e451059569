"""Backbones: timm ViTs that return dense patch tokens, and a mean-pool stand-in for tests.

A *backbone* is anything with ``patch_size``, ``stride`` and ``embed_dim`` attributes whose call
maps an already-normalised batch ``(B, 3, H, W)`` to patch features ``(B, C, h, w)`` with
``h = (H - patch_size) // stride + 1``: feature ``i`` describes pixels
``[i * stride, i * stride + patch_size)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATTENTION, FACETS
from .errors import ConfigError, InputError
from .filterbank import NAME as FILTERBANK
from .filterbank import FilterBank, filter_bank

__all__ = [
    "Backbone",
    "MeanPool",
    "ModelSpec",
    "RandomWeightsWarning",
    "load_backbone",
    "model_spec",
    "official_pos_embed",
]

log = logging.getLogger(__name__)


class RandomWeightsWarning(UserWarning):
    """A backbone runs with random weights: its features mean nothing."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a named model comes from.

    Parameters
    ----------
    timm_name : str
        timm architecture name, e.g. ``"vit_small_patch14_dinov2"``.
    hub_name : str or None
        Official torch-hub name, e.g. ``"dinov2_vits14"``.
    official_file : str or None
        File name of the official facebookresearch checkpoint.
    official_url : str or None
        Where that checkpoint is published.
    timm_repo : str or None
        Hugging Face repository holding timm weights.
    hf_repo : str or None
        Hugging Face repository holding transformers weights.
    """

    timm_name: str
    hub_name: str | None = None
    official_file: str | None = None
    official_url: str | None = None
    timm_repo: str | None = None
    hf_repo: str | None = None


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def _dinov2_specs() -> dict[str, ModelSpec]:
    specs = {}
    for letter, size in _DINOV2_SIZES.items():
        for reg in (False, True):
            hub = f"dinov2_vit{letter}14" + ("_reg" if reg else "")
            timm_name = f"vit_{size}_patch14_" + ("reg4_" if reg else "") + "dinov2"
            fname = f"dinov2_vit{letter}14" + ("_reg4" if reg else "") + "_pretrain.pth"
            hf = "facebook/dinov2-" + ("with-registers-" if reg else "") + size
            specs[hub] = ModelSpec(
                timm_name=timm_name,
                hub_name=hub,
                official_file=fname,
                official_url=f"{_DINOV2_URL}/dinov2_vit{letter}14/{fname}",
                timm_repo=f"timm/{timm_name}.lvd142m",
                hf_repo=hf,
            )
    return specs


def _dinov3_specs() -> dict[str, ModelSpec]:
    names = {
        "dinov3_vits16": "vit_small_patch16_dinov3",
        "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
        "dinov3_vitb16": "vit_base_patch16_dinov3",
        "dinov3_vitl16": "vit_large_patch16_dinov3",
        "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3",
        "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    }
    return {
        hub: ModelSpec(timm_name=t, hub_name=hub, timm_repo=f"timm/{t}.lvd1689m")
        for hub, t in names.items()
    }


MODELS: dict[str, ModelSpec] = {**_dinov2_specs(), **_dinov3_specs()}


def model_spec(name: str) -> ModelSpec:
    """Resolve an official hub name or a timm name to a :class:`ModelSpec`.

    >>> model_spec("dinov2_vits14").timm_name
    'vit_small_patch14_dinov2'
    >>> model_spec("vit_base_patch14_reg4_dinov2").hub_name
    'dinov2_vitb14_reg'
    """
    if name in MODELS:
        return MODELS[name]
    base = name.split(".")[0]
    for spec in MODELS.values():
        if spec.timm_name == base:
            return spec
    import timm

    if not timm.is_model(base):
        known = ", ".join(sorted(MODELS))
        raise ConfigError(
            f"Unknown backbone {name!r}. Use an official name ({known}) or any timm ViT name "
            "(see timm.list_models('vit_*'))."
        )
    return ModelSpec(timm_name=base)


def official_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample square patch position embeddings to ``grid`` with the official DINOv2 rule.

    Bicubic, no antialiasing, with the scale factor ``(n + 0.1) / M`` rather than the output
    size (the "historical kludge" of the official code), computed in float32. The embeddings are
    returned unchanged when the grid is the native square one.

    Parameters
    ----------
    pos_embed : torch.Tensor
        ``(1, M * M, D)`` embeddings of the patch positions (no class token).
    grid : tuple of int
        Target ``(h, w)``.

    Returns
    -------
    torch.Tensor
        ``(1, h * w, D)`` in the dtype of ``pos_embed``.
    """
    n_pos, dim = pos_embed.shape[1:]
    m = math.isqrt(n_pos)
    if m * m != n_pos:
        raise ConfigError(f"Position embeddings must form a square grid, got {n_pos} positions.")
    h, w = grid
    if h == m and w == m:
        return pos_embed
    scale = ((h + 0.1) / m, (w + 0.1) / m)
    grid_embed = pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid_embed, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False
    )
    if tuple(out.shape[-2:]) != (h, w):  # pragma: no cover - guarded by the 0.1 offset
        raise RuntimeError(
            f"Position embedding resampling gave {tuple(out.shape[-2:])}, not {grid}."
        )
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)


def grid_size(n_px: int, patch_size: int, stride: int) -> int:
    """Number of patches along an axis of ``n_px`` pixels.

    >>> grid_size(518, 14, 14), grid_size(518, 14, 7)
    (37, 73)
    """
    return (n_px - patch_size) // stride + 1


def valid_size(n_px: int, patch_size: int, stride: int) -> int:
    """Smallest size ``>= n_px`` that the patch grid covers exactly (``(n - P) % S == 0``).

    >>> valid_size(500, 14, 14), valid_size(518, 14, 7), valid_size(3, 14, 14)
    (504, 518, 14)
    """
    if n_px <= patch_size:
        return patch_size
    return patch_size + -(-(n_px - patch_size) // stride) * stride


def _check_input(x: torch.Tensor, patch_size: int, stride: int) -> None:
    if x.dim() != 4:
        raise InputError(
            f"Backbones take a batch (B, C, H, W); got a tensor of shape {tuple(x.shape)}."
        )
    h, w = x.shape[-2:]
    for n in (h, w):
        if n < patch_size or (n - patch_size) % stride:
            raise InputError(
                f"Input of size {h}x{w} does not fit the patch grid (patch {patch_size}, stride "
                f"{stride}): each side must be {patch_size} + k*{stride}. Pad it to "
                f"{valid_size(h, patch_size, stride)}x{valid_size(w, patch_size, stride)} "
                "(highres_features does this for you)."
            )


def _layer_index(layer: int, depth: int) -> int:
    """``layer`` (negative: from the end) as an index into ``depth`` blocks.

    >>> _layer_index(-1, 12), _layer_index(3, 12)
    (11, 3)
    """
    if int(layer) != layer or not -depth <= layer < depth:
        raise ConfigError(
            f"layer must be a block index in {-depth}..{depth - 1} for this {depth}-block model, "
            f"got {layer!r}; -1 is the last block."
        )
    return int(layer) % depth


def _check_outputs(facet: str, attention: str) -> None:
    if facet not in FACETS:
        raise ConfigError(f"facet must be one of {', '.join(FACETS)}, got {facet!r}.")
    if attention not in ATTENTION:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}.")
    if attention == "only" and facet != "token":
        raise ConfigError(
            f"attention='only' gives the attention maps alone, so facet={facet!r} would be "
            "ignored; use attention='append' to have both, or leave facet at 'token'."
        )


def layer_qkv(block: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values ``(B, heads, N, head_dim)`` of a timm ``Block`` on its input.

    As the block's attention computes them: ``qkv(norm1(tokens))`` split into heads, then the
    query and key norms (identities in DINOv2).
    """
    attn = block.attn
    b, n, _ = tokens.shape
    qkv = attn.qkv(block.norm1(tokens))
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


class Backbone(nn.Module):
    """A timm ViT that returns per-patch features of one of its blocks as a feature map.

    The call runs the model on exactly the tensor given (no normalisation inside) and returns
    ``(B, embed_dim, h, w)`` without class and register tokens. Absolute position embeddings are
    resampled with the official DINOv2 rule (:func:`official_pos_embed`) for any input size and
    for a patch-embedding ``stride`` smaller than the patch size (the stride trick).

    By default the features are the last block's tokens after the final norm. ``layer`` picks
    another block (its output tokens, without the final norm), ``facet`` its attention's keys,
    queries or values (input of that block's attention, heads concatenated, as in Amir et al.'s
    dense descriptors) and ``attention`` adds (or gives alone) the class token's softmax
    attention to each patch, one channel per head. All are per-patch maps like the tokens, so the
    ensemble treats them alike; ``embed_dim`` is their number of channels.

    Parameters
    ----------
    model : timm.models.VisionTransformer or timm.models.Eva
        The timm model, weights loaded.
    name : str
        Model name, recorded in outputs.
    stride : int, optional
        Patch-embedding stride; must divide the patch size. Defaults to the patch size.
    weights_origin : str, optional
        Where the weights came from ("random", a path, a cache, a URL), recorded in outputs.
    layer : int, optional
        Block index, negative from the end (default -1, the last).
    facet : {"token", "key", "query", "value"}, optional
    attention : {"none", "append", "only"}, optional
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        stride: int | None = None,
        weights_origin: str = "",
        layer: int = -1,
        facet: str = "token",
        attention: str = "none",
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.weights_origin = weights_origin
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.stride = self.patch_size if stride is None else int(stride)
        if self.stride < 1 or self.patch_size % self.stride:
            raise ConfigError(
                f"stride must divide the patch size {self.patch_size}, got {stride!r} "
                f"(try {self.patch_size // 2})."
            )
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self._uses_rope = getattr(model, "pos_embed", None) is None
        if self._uses_rope and self.stride != self.patch_size:
            raise ConfigError(
                f"{name} uses rotary position embeddings; the stride trick (stride={stride}) is "
                "only implemented for absolute position embeddings (DINOv2 and most timm ViTs)."
            )
        _check_outputs(facet, attention)
        depth = len(model.blocks)
        self.layer, self.facet, self.attention = _layer_index(layer, depth), facet, attention
        self._default = self.layer == depth - 1 and facet == "token" and attention == "none"
        if self._uses_rope and not self._default:
            raise ConfigError(
                f"{name} uses rotary position embeddings; layer, facet and attention are only "
                "implemented for absolute position embeddings (DINOv2 and most timm ViTs)."
            )
        if facet != "token":
            self.embed_dim = int(model.blocks[self.layer].attn.qkv.out_features) // 3
        self.num_heads = int(model.blocks[self.layer].attn.num_heads)
        if attention == "append":
            self.embed_dim += self.num_heads
        elif attention == "only":
            self.embed_dim = self.num_heads

    @property
    def options(self) -> dict[str, int | str]:
        """The choices of layer, facet and attention that differ from the default (for attrs)."""
        if self._default:
            return {}
        out: dict[str, int | str] = {}
        if self.layer != len(self.model.blocks) - 1:
            out["layer"] = self.layer
        if self.facet != "token":
            out["facet"] = self.facet
        if self.attention != "none":
            out["attention"] = self.attention
        return out

    @property
    def random_weights(self) -> bool:
        return self.weights_origin == "random"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch_size={self.patch_size}, stride={self.stride}, "
            f"embed_dim={self.embed_dim}, weights={self.weights_origin!r}"
            + "".join(f", {k}={v!r}" for k, v in self.options.items())
        )

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed ``x`` and add prefix tokens and position embeddings."""
        m = self.model
        proj = m.patch_embed.proj
        t = F.conv2d(x, proj.weight, proj.bias, stride=self.stride)
        grid = (t.shape[-2], t.shape[-1])
        t = m.patch_embed.norm(t.flatten(2).transpose(1, 2))
        b = t.shape[0]
        prefix = []
        if m.cls_token is not None:
            prefix.append(m.cls_token.expand(b, -1, -1))
        if getattr(m, "reg_token", None) is not None:
            prefix.append(m.reg_token.expand(b, -1, -1))
        pos = m.pos_embed
        # timm folds the class-token position into cls_token for register models
        # (no_embed_class); otherwise pos_embed starts with one entry per prefix token.
        n_pre = 0 if m.no_embed_class else int(m.num_prefix_tokens)
        patch_pos = official_pos_embed(pos[:, n_pre:], grid)
        if n_pre:
            t = torch.cat(prefix + [t], dim=1) + torch.cat([pos[:, :n_pre], patch_pos], dim=1)
        else:
            t = torch.cat(prefix + [t + patch_pos], dim=1)
        return t, grid

    def _layer_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N_patches, C)`` features of the chosen block from the tokens entering it."""
        m, n_pre = self.model, self.num_prefix_tokens
        block = m.blocks[self.layer]
        parts = []
        if self.facet == "token" and self.attention != "only":
            out = block(tokens)
            parts.append(m.norm(out) if self.layer == len(m.blocks) - 1 else out)
        if self.facet != "token" or self.attention != "none":
            q, k, v = layer_qkv(block, tokens)
            if self.facet != "token":
                f = {"query": q, "key": k, "value": v}[self.facet]
                parts.append(f.transpose(1, 2).flatten(2))
            if self.attention != "none":
                cls = q[:, :, :1] * block.attn.scale  # (B, heads, 1, hd)
                att = (cls @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, heads, N)
                parts.append(att.transpose(1, 2))
        return torch.cat(parts, dim=-1)[:, n_pre:] if len(parts) > 1 else parts[0][:, n_pre:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.patch_size, self.stride)
        if self._uses_rope:
            tokens = self.model.forward_features(x)
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        else:
            m = self.model
            tokens, grid = self._tokens(x)
            tokens = m.norm_pre(tokens)
            if not self._default:
                for block in m.blocks[: self.layer]:
                    tokens = block(tokens)
                patches = self._layer_features(tokens)
                return patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)
            for block in m.blocks:
                tokens = block(tokens)
            tokens = m.norm(tokens)
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)


class MeanPool(nn.Module):
    """A backbone whose features are the means of the patch windows.

    Linear and exactly centred, so a linear ramp goes through the whole HR-Dv2 ensemble
    unchanged: the reference for geometry tests.

    Parameters
    ----------
    patch_size : int, optional
    stride : int, optional
        Must divide ``patch_size``.

    Examples
    --------
    >>> mp = MeanPool(14, 7)
    >>> mp(torch.zeros(1, 3, 28, 42)).shape
    torch.Size([1, 3, 3, 5])
    """

    def __init__(self, patch_size: int = 14, stride: int = 14, *, channels: int = 3) -> None:
        super().__init__()
        if stride < 1 or patch_size % stride:
            raise ConfigError(f"stride must divide patch_size={patch_size}, got {stride!r}.")
        self.patch_size = patch_size
        self.stride = stride
        self.embed_dim = channels
        self.name = f"meanpool_p{patch_size}_s{stride}"
        self.weights_origin = "none (mean pooling)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.patch_size, self.stride)
        return F.avg_pool2d(x, kernel_size=self.patch_size, stride=self.stride)


def load_backbone(
    name: str,
    weights: str | None = None,
    stride: int | None = None,
    device: str | torch.device = "cpu",
    *,
    download: bool = True,
    layer: int = -1,
    facet: str = "token",
    attention: str = "none",
    **overrides,
) -> Backbone | FilterBank:
    """Build a backbone from timm and load its weights.

    Parameters
    ----------
    name : str
        Official hub name (``"dinov2_vits14"``, ``"dinov2_vitb14_reg"``, ``"dinov3_vits16"``...)
        or a timm model name (``"vit_small_patch14_dinov2"``...), or ``"filterbank"`` for the
        classical per-pixel features of :class:`~hrdv2_dask.filterbank.FilterBank` (no weights;
        ``overrides`` are its options).
    weights : str or os.PathLike, optional
        A checkpoint file (official ``.pth``, timm ``.safetensors``/``.pth``, or Hugging Face
        ``Dinov2Model`` ``.safetensors``), or ``"random"`` for random weights (testing only;
        warns loudly). ``None`` looks in the torch-hub and Hugging Face caches and then
        downloads (when ``download``).
    stride : int, optional
        Patch-embedding stride (the stride trick); must divide the patch size.
    device : str or torch.device, optional
    download : bool, optional
        Allow downloading weights when they are not cached.
    layer, facet, attention : optional
        Which per-patch features the backbone gives (see :class:`Backbone`): the tokens of the
        last block after the final norm by default.
    **overrides
        Passed to ``timm.create_model`` (e.g. ``depth=2, embed_dim=64, num_heads=4`` for tiny
        test models).

    Returns
    -------
    Backbone

    Raises
    ------
    WeightsNotFoundError
        No weights were found; the message lists where it looked and how to fix it.
    WeightsFormatError
        A checkpoint does not fit the architecture.
    """
    import timm

    from .weights import load_state_dict, resolve_weights

    if name == FILTERBANK:
        outputs = dict(layer=layer, facet=facet, attention=attention)
        return filter_bank(weights, stride, outputs=outputs, **overrides).to(device)
    spec = model_spec(name)
    overrides.setdefault("dynamic_img_size", True)
    try:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **overrides)
    except TypeError as err:
        raise ConfigError(f"Cannot build {spec.timm_name!r} with {overrides!r}: {err}") from err
    if weights is not None and str(weights) == "random":
        origin = "random"
        msg = (
            f"{name} is running with RANDOM WEIGHTS: its features are meaningless. "
            "Pass weights=PATH to a checkpoint for real features."
        )
        log.warning(msg)
        warnings.warn(msg, RandomWeightsWarning, stacklevel=2)
    else:
        path, origin = resolve_weights(spec, weights, download=download)
        load_state_dict(model, path)
    backbone = Backbone(
        model,
        name=name,
        stride=stride,
        weights_origin=origin,
        layer=layer,
        facet=facet,
        attention=attention,
    )
    backbone.weights_path = None if origin == "random" else path
    return backbone.to(device)
