"""Contact sheets: a grid of small pictures, each with its caption (a member key, a hit)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["write_contact_sheet"]

_CAPTION_PX = 16
_GAP_PX = 4


def _thumbnail(picture: str | os.PathLike | np.ndarray, tile_px: int) -> Image.Image:
    if isinstance(picture, np.ndarray):
        img = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    else:
        with Image.open(picture) as opened:
            img = opened.copy()
    img = img.convert("RGB")
    scale = tile_px / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def write_contact_sheet(
    items: Sequence[tuple[str, str | os.PathLike | np.ndarray]],
    path: str | os.PathLike,
    *,
    tile_px: int = 256,
    columns: int | None = None,
) -> Path:
    """Write a PNG grid of pictures, each scaled to fit ``tile_px`` with its caption below.

    Parameters
    ----------
    items : sequence of (str, picture)
        Caption and picture (a PNG/JPEG path, or an ``(h, w)`` / ``(h, w, 3)`` uint8 array),
        in reading order.
    path : str or os.PathLike
        The PNG written (its folder must exist).
    tile_px : int, optional
        Longest side of each thumbnail in px.
    columns : int, optional
        Pictures per row; default ``ceil(sqrt(n))``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = write_contact_sheet([("a", np.zeros((8, 8), np.uint8))] * 3, f"{tmp}/s.png",
    ...                             tile_px=32)
    ...     Image.open(p).size
    (68, 100)
    """
    if not items:
        raise ValueError("a contact sheet needs at least one picture")
    cols = columns or math.ceil(math.sqrt(len(items)))
    rows = math.ceil(len(items) / cols)
    cell_w, cell_h = tile_px + _GAP_PX, tile_px + _CAPTION_PX + _GAP_PX
    sheet = Image.new("RGB", (cols * cell_w - _GAP_PX, rows * cell_h - _GAP_PX), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, picture) in enumerate(items):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w, r * cell_h
        thumb = _thumbnail(picture, tile_px)
        sheet.paste(thumb, (x0 + (tile_px - thumb.width) // 2, y0))
        draw.text((x0 + 2, y0 + thumb.height + 2), str(caption), fill="black")
    path = Path(path)
    sheet.save(path)
    return path
