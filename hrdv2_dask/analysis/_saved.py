"""The saved-model format: a folder of JSON, arrays and (for classifiers) a skops file.

Layout of a saved model::

    model/
      model.json       {"format": "hrdv2-model", "version": 1, "kind": ..., "fields": {...}}
      arrays.npz       the model's numpy arrays (loaded with allow_pickle=False)
      estimator.skops  a fitted scikit-learn estimator (segmenters only)

Nothing here runs code from the file: JSON and npz hold data only, and skops refuses every type
that is not scikit-learn's own or listed in :data:`TRUSTED` (never plain pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import outputs

__all__ = ["FORMAT", "TRUSTED", "read_fields", "save_fields", "saved"]

FORMAT = "hrdv2-model"
_VERSION = 1
#: Types skops does not trust by default that a random forest needs (its fitted trees).
TRUSTED = ("sklearn.tree._tree.Tree",)


def save_fields(
    path: str | os.PathLike, kind: str, fields: Mapping[str, Any], estimator: Any = None
) -> Path:
    """Write a model: ``fields`` (numpy arrays go to ``arrays.npz``) and an ``estimator``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(
            f"Cannot save the model to {str(path)!r}: it is an existing file; a model is a "
            "folder, choose another path (e.g. model/)."
        )
    arrays = {k: np.asarray(v) for k, v in fields.items() if isinstance(v, np.ndarray)}
    meta = {
        "format": FORMAT,
        "version": _VERSION,
        "kind": kind,
        "fields": {k: v for k, v in fields.items() if k not in arrays},
        "arrays": sorted(arrays),
        "estimator": estimator is not None,
    }
    with outputs.staged(path) as tmp:  # a model appears only once all its files are written
        tmp.mkdir()
        np.savez(tmp / "arrays.npz", **arrays)
        if estimator is not None:
            import skops.io

            skops.io.dump(estimator, tmp / "estimator.skops")
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def read_fields(path: str | os.PathLike) -> tuple[str, dict[str, Any], Any]:
    """``(kind, fields, estimator or None)`` of a model written by :func:`save_fields`."""
    path = Path(path)
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(
            f"{str(path)!r} is not a saved hrdv2 model (cannot read model.json: {err}); save "
            "one with --save-model PATH on pca, cluster or segment."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{str(path)!r}/model.json is not a saved hrdv2 model.")
    if meta.get("version") != _VERSION:
        raise InputError(
            f"{str(path)!r} is a model of format version {meta.get('version')}; this version "
            f"of hrdv2_dask reads version {_VERSION}: save it again."
        )
    fields = dict(meta.get("fields") or {})
    try:
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            fields.update({k: npz[k] for k in meta.get("arrays") or []})
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"Cannot read the arrays of model {str(path)!r}: {err}") from None
    estimator = None
    if meta.get("estimator"):
        import skops.io

        file = path / "estimator.skops"
        try:
            untrusted = set(skops.io.get_untrusted_types(file=file)) - set(TRUSTED)
            if untrusted:
                raise InputError(
                    f"The estimator of model {str(path)!r} holds types that are not trusted "
                    f"({sorted(untrusted)}); refusing to load it. Save the model again with "
                    "hrdv2_dask."
                )
            estimator = skops.io.load(file, trusted=list(TRUSTED))
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
            raise InputError(f"Cannot read the estimator of model {str(path)!r}: {err}") from None
    return str(meta.get("kind")), fields, estimator


def saved(model: Any, path: str | os.PathLike | None) -> dict[str, str]:
    """``{"model": folder}`` after ``model.save(path)`` (the ``--save-model`` option), or ``{}``
    without a path: the entry a run function adds to its summary."""
    return {"model": str(model.save(path))} if path else {}
