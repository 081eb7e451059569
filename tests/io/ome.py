"""OME-Zarr checks shared by the tests: ``from ome import assert_valid_ome_zarr``.

The NGFF metadata is validated by ome-zarr-models, the library that owns the format, against
the version the group declares (0.4 on Zarr v2, 0.5 on Zarr v3).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import zarr
from ome_zarr_models import v04, v05

#: OME-Zarr version -> (Zarr format it must be stored in, ome-zarr-models image class).
_MODELS: dict[str, tuple[int, Any]] = {"0.4": (2, v04.Image), "0.5": (3, v05.Image)}


def declared_ome_version(attrs: dict[str, Any]) -> str | None:
    """The OME-Zarr version in a group's attributes (0.5: ``ome.version``; 0.4: multiscales).

    Examples
    --------
    >>> declared_ome_version({"ome": {"version": "0.5"}})
    '0.5'
    >>> declared_ome_version({"multiscales": [{"version": "0.4"}]}), declared_ome_version({})
    ('0.4', None)
    """
    if isinstance(attrs.get("ome"), dict):
        return attrs["ome"].get("version")
    multiscales = attrs.get("multiscales") or [{}]
    return multiscales[0].get("version")


def assert_valid_ome_zarr(path: str | os.PathLike[str]) -> Any:
    """Fail unless ``path`` is a valid OME-Zarr image of the version it declares.

    Parameters
    ----------
    path : str or os.PathLike
        Folder of an OME-Zarr image group.

    Returns
    -------
    ome_zarr_models.v04.Image or ome_zarr_models.v05.Image
        The validated model, for further checks.

    Raises
    ------
    AssertionError
        If the group declares no or an unknown version, is stored in the wrong Zarr format,
        fails ome-zarr-models validation or makes it warn.
    """
    group = zarr.open_group(str(path), mode="r")
    version = declared_ome_version(group.attrs.asdict())
    if version not in _MODELS:
        raise AssertionError(f"{path}: declares OME-Zarr version {version!r}, not 0.4 or 0.5")
    zarr_format, model = _MODELS[version]
    if group.metadata.zarr_format != zarr_format:
        raise AssertionError(
            f"{path}: OME-Zarr {version} must be Zarr v{zarr_format}, "
            f"got v{group.metadata.zarr_format}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = model.from_zarr(group)
        except ValueError as err:  # pydantic's ValidationError is one
            raise AssertionError(f"{path}: invalid OME-Zarr {version}: {err}") from err
    ome_warnings = [w for w in caught if "ome_zarr_models" in str(w.filename)]
    if ome_warnings:
        raise AssertionError(
            f"{path}: ome-zarr-models warns: {[str(w.message) for w in ome_warnings]}"
        )
    return image
