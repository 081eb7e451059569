"""A classical filter-bank backbone: per-pixel intensity, edges and texture at several scales.

The ilastik/Weka-style features that the HR-Dv2 authors compare DINOv2 with (a random forest on
them reaches 0.35–0.41 mIoU against 0.80–0.86 for DINOv2 in their weakly supervised study), from
:func:`skimage.feature.multiscale_basic_features`: for each input channel and each Gaussian scale,
the smoothed intensity, its Sobel gradient magnitude and the two Hessian eigenvalues. It needs no
weights, has patch size 1 (a feature per pixel, so no shift ensemble) and a finite support, its
``halo_px``: the tiling gives every window that much context, so tiled equals whole.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, InputError

__all__ = ["FilterBank", "filter_bank"]

#: The backbone name that selects the filter bank.
NAME = "filterbank"
# scipy's Gaussian kernel radius is int(truncate * sigma + 0.5) with truncate 4 (skimage's).
_TRUNCATE = 4.0
# Beyond the Gaussian: Sobel reads 1 px further, the Hessian's two np.gradient passes 2 px.
_DERIVATIVE_PX = 2


def _sigmas(sigma_min: float, sigma_max: float, num_sigma: int | None) -> np.ndarray:
    """skimage's scales: powers of 2 from ``sigma_min`` unless ``num_sigma`` is given.

    >>> _sigmas(0.5, 16, None).tolist()
    [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    """
    if num_sigma is None:
        num_sigma = int(np.log2(sigma_max) - np.log2(sigma_min) + 1)
    return np.logspace(np.log2(sigma_min), np.log2(sigma_max), num=num_sigma, base=2)


class FilterBank(nn.Module):
    """Multiscale intensity, edge and texture features of each pixel (no weights).

    Parameters
    ----------
    sigma_min, sigma_max : float, optional
        Smallest and largest Gaussian scale in px (skimage's defaults 0.5 and 16).
    num_sigma : int, optional
        Number of scales; default: powers of 2 from ``sigma_min`` to ``sigma_max``.
    intensity, edges, texture : bool, optional
        Which kinds of features (at least one).
    channels : int, optional
        Input channels (3 for the pipeline's RGB windows).

    Examples
    --------
    >>> fb = FilterBank(sigma_max=2)
    >>> fb.embed_dim, fb.halo_px, fb.channel_names[:2]
    (36, 10, ['c0_intensity_s0.5', 'c0_edges_s0.5'])
    >>> fb(torch.zeros(1, 3, 20, 30)).shape
    torch.Size([1, 36, 20, 30])
    """

    patch_size = 1
    stride = 1
    needs_weights = False
    weights_origin = "none (filter bank)"

    def __init__(
        self,
        *,
        sigma_min: float = 0.5,
        sigma_max: float = 16.0,
        num_sigma: int | None = None,
        intensity: bool = True,
        edges: bool = True,
        texture: bool = True,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if not (0 < sigma_min <= sigma_max):
            raise ConfigError(
                f"filterbank needs 0 < sigma_min <= sigma_max, got {sigma_min!r} and "
                f"{sigma_max!r}; e.g. sigma_min=0.5, sigma_max=16."
            )
        if not (intensity or edges or texture):
            raise ConfigError(
                "filterbank needs at least one of intensity, edges, texture; leave one true."
            )
        self.kinds = dict(intensity=bool(intensity), edges=bool(edges), texture=bool(texture))
        self.sigmas = _sigmas(float(sigma_min), float(sigma_max), num_sigma)
        # recorded in the store's settings (what determines the values)
        self.options = {
            "sigmas": [float(v) for v in self.sigmas],
            "filters": [k for k, on in self.kinds.items() if on],
        }
        self.in_channels = int(channels)
        self.channel_names = self._names()
        self.embed_dim = len(self.channel_names)
        self.halo_px = int(_TRUNCATE * float(self.sigmas.max()) + 0.5) + _DERIVATIVE_PX
        self.name = NAME

    def _names(self) -> list[str]:
        per_scale = (["intensity"] if self.kinds["intensity"] else []) + (
            ["edges"] if self.kinds["edges"] else []
        )
        per_scale += ["texture0", "texture1"] if self.kinds["texture"] else []
        return [
            f"c{c}_{kind}_s{s:g}"
            for c in range(self.in_channels)
            for s in self.sigmas
            for kind in per_scale
        ]

    def extra_repr(self) -> str:
        return f"sigmas={self.sigmas.tolist()}, kinds={self.kinds}, channels={self.embed_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from skimage.feature import multiscale_basic_features

        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"filterbank takes a batch (B, {self.in_channels}, H, W); got a tensor of shape "
                f"{tuple(x.shape)}."
            )
        images = x.detach().float().cpu().numpy()
        out = [
            multiscale_basic_features(
                np.moveaxis(img, 0, -1),
                **self.kinds,
                sigma_min=float(self.sigmas[0]),
                sigma_max=float(self.sigmas[-1]),
                num_sigma=len(self.sigmas),
                workers=1,
                channel_axis=-1,
            )
            for img in images
        ]
        feats = torch.from_numpy(np.stack(out).astype(np.float32, copy=False))
        return feats.permute(0, 3, 1, 2).contiguous().to(x.device)


def filter_bank(
    weights: str | None = None, stride: int | None = None, *, outputs: dict, **options
) -> FilterBank:
    """The filter bank as :func:`hrdv2_dask.load_backbone` builds it by name (checks included).

    ``options`` are :class:`FilterBank`'s keywords (``--model-option sigma_max=8``).
    """
    if weights is not None:
        raise ConfigError(
            f"filterbank has no weights, got weights={str(weights)!r}; leave weights unset."
        )
    if stride not in (None, 1):
        raise ConfigError(
            f"filterbank has a feature per pixel (stride 1), got stride={stride!r}; leave it unset."
        )
    chosen = {k: v for k, v in outputs.items() if v not in (-1, "token", "none")}
    if chosen:
        raise ConfigError(
            f"filterbank has no transformer layers, so {chosen} do not apply; leave them unset."
        )
    options.pop("dynamic_img_size", None)
    try:
        return FilterBank(**options)
    except TypeError as err:
        raise ConfigError(
            f"filterbank options are sigma_min, sigma_max, num_sigma, intensity, edges, texture; "
            f"got {sorted(options)}."
        ) from err
