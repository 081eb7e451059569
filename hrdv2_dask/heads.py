"""Linear heads: maps applied to every feature vector, on the worker, before upsampling.

Resampling a low-resolution map (bilinear weights that sum to 1), undoing a transform and
averaging views are all linear and preserve constants, so an affine head ``f -> W f + b`` gives
the same result whether it runs on the full-resolution features or on each view's
low-resolution map before resampling. Running it first is far cheaper: a PCA to 16 channels
resamples 16 channels instead of 384. :func:`hrdv2_dask.highres_features` takes a head with
``head=``, and :func:`hrdv2_dask.extract` uses one for ``components=K``, fitted with
:func:`pca_basis` (numpy only, also used by :func:`hrdv2_dask.analysis.fit_pca`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["LinearHead", "pca_basis"]


def pca_basis(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """PCA of samples: mean, top-``k`` components, their variances and the total variance.

    The covariance is accumulated in float64 over slices of 16384 rows, so ``x`` may be a large
    float16/float32 sample. Component signs are fixed (largest entry positive) so that fits
    are reproducible.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, C)`` samples, one feature vector per row.
    k : int
        Number of components, 1 to C.

    Returns
    -------
    mean : numpy.ndarray
        ``(C,)`` float64 mean.
    components : numpy.ndarray
        ``(k, C)`` float64 unit principal directions, by decreasing variance.
    variances : numpy.ndarray
        ``(k,)`` float64 variance along each component (>= 0).
    total : float
        Total variance (sum over all C directions).

    Examples
    --------
    >>> x = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [2.0, 0.1]])
    >>> mean, comps, var, total = pca_basis(x, 1)
    >>> mean.tolist(), comps.round(3).tolist()
    ([2.0, 0.025], [[1.0, 0.0]])
    """
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for start in range(0, len(x), 16384):
        xc = x[start : start + 16384].astype(np.float64) - mean
        cov += xc.T @ xc
    cov /= max(len(x) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:k]
    comps = evecs[:, order].T
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    return mean, comps, np.clip(evals[order], 0.0, None), float(np.clip(evals, 0, None).sum())


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
