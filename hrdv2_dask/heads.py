"""Linear heads: maps applied to every feature vector, on the worker, before upsampling.

Resampling a low-resolution map (bilinear weights that sum to 1), undoing a transform and
averaging views are all linear and preserve constants, so an affine head ``f -> W f + b`` gives
the same result whether it runs on the full-resolution features or on each view's
low-resolution map before resampling. Running it first is far cheaper: a PCA to 16 channels
resamples 16 channels instead of 384. :func:`hrdv2_dask.highres_features` takes a head with
``head=``, and :func:`hrdv2_dask.extract` uses one for ``components=K``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["LinearHead"]


@dataclass(frozen=True, eq=False)
class LinearHead:
    """An affine map ``out = weight @ f + bias`` of each feature vector.

    Parameters
    ----------
    weight : numpy.ndarray
        ``(K, C)`` float32: K output channels from C backbone channels.
    bias : numpy.ndarray, optional
        ``(K,)`` float32; default zeros.
    name : str, optional
        What the head computes, recorded in the store's attributes (``"pca"``, ``"linear"``...).

    Examples
    --------
    >>> head = LinearHead.from_pca(np.array([1.0, 2.0]), np.array([[1.0, 0.0]]))
    >>> head.apply(torch.tensor([[[[3.0]], [[5.0]]]])).flatten().tolist()
    [2.0]
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    name: str = "linear"

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, dtype=np.float32)
        if w.ndim != 2 or 0 in w.shape:
            raise ConfigError(
                f"LinearHead weight must be a non-empty (K, C) matrix, got shape {w.shape}."
            )
        b = np.zeros(w.shape[0], np.float32) if self.bias is None else self.bias
        b = np.asarray(b, dtype=np.float32)
        if b.shape != (w.shape[0],):
            raise ConfigError(
                f"LinearHead bias must have shape ({w.shape[0]},) to match weight {w.shape}, "
                f"got {b.shape}."
            )
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ConfigError("LinearHead weight and bias must be finite (no NaN or inf).")
        object.__setattr__(self, "weight", np.ascontiguousarray(w))
        object.__setattr__(self, "bias", np.ascontiguousarray(b))

    @classmethod
    def from_pca(cls, mean: np.ndarray, components: np.ndarray) -> LinearHead:
        """The PCA projection ``components @ (f - mean)`` as a head.

        Parameters
        ----------
        mean : numpy.ndarray
            ``(C,)`` mean feature.
        components : numpy.ndarray
            ``(K, C)`` principal axes, one per row.
        """
        comps = np.asarray(components, np.float64)
        return cls(comps, -comps @ np.asarray(mean, np.float64), name="pca")

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, feats: torch.Tensor) -> torch.Tensor:
        """Map ``(n, C, h, w)`` features to ``(n, K, h, w)`` float32 (on their device)."""
        if feats.dim() != 4 or feats.shape[1] != self.in_channels:
            got = feats.shape[1] if feats.dim() > 1 else "?"
            raise ConfigError(
                f"LinearHead maps {self.in_channels} channels but got features of shape "
                f"{tuple(feats.shape)} (the backbone gives {got} channels); fit the head on "
                "features of this backbone."
            )
        w = torch.as_tensor(self.weight, device=feats.device)
        b = torch.as_tensor(self.bias, device=feats.device)
        out = torch.einsum("kc,nchw->nkhw", w, feats.float())
        return out.add_(b[None, :, None, None])
