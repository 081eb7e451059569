"""A contact sheet of search hits: each hit region cropped from its source image, box drawn.

Only the crops are read from the sources (lazily opened with
:func:`hrdv2_dask.io.readers.open_image`, as each store's provenance records them), mapped
to 8 bits with the store's ``value_range`` and laid out in a grid with their key and score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.sheets import write_contact_sheet

__all__ = ["crop_box", "write_hit_sheet"]

_TILE_PX = 192
_COLUMNS = 5
_BOX_RGB = (255, 40, 40)
_QUERY_RGB = (40, 220, 40)


def crop_box(
    box: Sequence[int], shape: tuple[int, int], margin: float = 0.5
) -> tuple[int, int, int, int]:
    """The crop around ``box`` ``(y0, x0, y1, x1)``: ``margin`` of its size on each side, cut
    to the image ``shape``.

    >>> crop_box((10, 10, 20, 30), (100, 100))
    (5, 0, 25, 40)
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    my, mx = round((y1 - y0) * margin), round((x1 - x0) * margin)
    return max(y0 - my, 0), max(x0 - mx, 0), min(y1 + my, shape[0]), min(x1 + mx, shape[1])


def _to_rgb(pixels: np.ndarray, value_range: Sequence[float] | None) -> np.ndarray:
    """``(h, w, c)`` source pixels as ``(h, w, 3)`` uint8 (gray, RGB, or the first 3 channels)."""
    x = pixels.astype(np.float32)
    if value_range:
        lo, hi = float(value_range[0]), float(value_range[1])
    elif pixels.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    else:
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    x = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    if x.shape[-1] < 3:
        x = np.repeat(x[..., :1], 3, axis=-1)
    return np.nan_to_num(x[..., :3]).astype(np.uint8)


def _open_source(key: str, member: Mapping[str, Any]):
    from ..io.readers import open_image

    source = member.get("source") or {}
    if not source.get("path"):
        raise InputError(
            f"Member {key!r} was computed from an in-memory array (no source path recorded), "
            "so its hits cannot be cropped; search without --out, or index stores made from "
            "image files."
        )
    data, _ = open_image(
        source["path"], level=int(source.get("level") or 0), plane=source.get("plane")
    )
    return data


def write_hit_sheet(
    hits: Sequence[Mapping[str, Any]],
    members: Mapping[str, Mapping[str, Any]],
    path: Path,
    *,
    queries: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write the contact sheet of ``hits`` (from :func:`.retrieval.search`) to ``path`` (PNG).

    ``members`` is the index's ``key -> {source, value_range, ...}`` table; ``queries``
    (``key`` and ``box``) come first, their boxes drawn in green, captioned ``query``.
    """
    from PIL import Image, ImageDraw

    if not hits:
        raise InputError(f"No hits to draw in {str(path)!r}; the index holds no region.")
    sources: dict[str, Any] = {}
    items = []
    tiles = [({**q, "score": None}, _QUERY_RGB) for q in queries]
    for hit, colour in [*tiles, *((h, _BOX_RGB) for h in hits)]:
        key = hit["key"]
        if key not in sources:
            sources[key] = _open_source(key, members[key])
        data = sources[key]
        y0, x0, y1, x1 = crop_box(hit["box"], tuple(data.shape[:2]))
        rgb = _to_rgb(np.asarray(data[y0:y1, x0:x1].compute()), members[key].get("value_range"))
        scale = _TILE_PX / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
        tile = Image.fromarray(rgb).resize(size, resample)
        by0, bx0, by1, bx1 = hit["box"]
        rect = [(bx0 - x0) * scale, (by0 - y0) * scale, (bx1 - x0) * scale - 1,
                (by1 - y0) * scale - 1]  # fmt: skip
        ImageDraw.Draw(tile).rectangle(rect, outline=colour, width=2)
        score = "query" if hit["score"] is None else f"{hit['score']:.3f}"
        items.append((f"{key} {score}", np.asarray(tile)))
    return write_contact_sheet(items, path, tile_px=_TILE_PX, columns=min(_COLUMNS, len(items)))
