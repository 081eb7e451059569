"""From a source's layout to ``(y, x, c)``: axes planning, the chunk policy and lazy wrapping.

Pure shape arithmetic (:func:`_plan_axes`, :func:`_raw_chunks`) plus :func:`_open_chunked`, the
shared end of the chunked-file readers (Zarr, TIFF).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da

from hrdv2_dask.errors import InputError

from ._base import (
    _FILE_PLANE_FIX,
    DEFAULT_CHUNK_PX,
    MAX_CHUNK_PX,
    MIN_CHUNK_PX,
    OpenedImage,
    _check_dtype,
    _finish,
    _from_lazy,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _AxesPlan:
    """How to turn a source of some layout into ``(y, x, c)``."""

    axes: str  # source axes as reported in ImageMeta.axes
    y: int  # source dim of y
    x: int  # source dim of x
    c: int | None  # source dim of the channels, None for grayscale
    drop: tuple[int, ...]  # singleton source dims indexed away
    # with ``plane=``: the stack dim (Z or T) indexed at ``plane``, and its length
    plane_dim: int | None = None
    plane: int = 0

    def plane_info(self, shape: Sequence[int]) -> tuple[str, int, int] | None:
        """``(axis, index, count)`` of the opened plane of a stack, None for a single image."""
        if self.plane_dim is None:
            return None
        return (self.axes.upper()[self.plane_dim], self.plane, int(shape[self.plane_dim]))


def _plan_axes(
    shape: Sequence[int],
    axes: str | None,
    *,
    from_metadata: bool,
    what: str,
    fix: str,
    plane: int | None = None,
) -> _AxesPlan:
    """Work out where y, x and c are in ``shape`` from ``axes`` or, without it, from the shape.

    Parameters
    ----------
    shape : sequence of int
        Source shape.
    axes : str, optional
        Axis letters, one per dim, from file metadata or the user; None to detect.
    from_metadata : bool
        Whether ``axes`` came from metadata (unknown letters allowed as singletons) rather than
        from the user (only ``TZCSYX``).
    what : str
        Description of the source for messages, including its shape.
    fix : str
        How to select a single plane, for messages.
    plane : int, optional
        Open this plane of a stack: one Z or T axis (or, detected from the shape, a leading
        axis that is not a channel count) may then be longer than 1. Without it every axis but
        Y, X and C must have length 1.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise InputError(
            f"{what} has {len(shape)} dim(s); an image needs at least 2 (y, x). Reshape it to "
            "(height, width) or (height, width, channels)."
        )
    if 0 in shape:
        raise InputError(f"{what} is empty (zero-size); pass an image with at least one pixel.")
    if (
        axes is not None
        and from_metadata
        and len(axes) == len(shape)
        and any(a not in "TZCSYX" and s != 1 for a, s in zip(axes.upper(), shape, strict=True))
    ):
        # Metadata names a long axis it does not understand (tifffile's Q, I, ...): use the
        # shape instead, as for a plain array.
        logger.debug("%s: metadata axes %r name an unknown axis; detecting axes", what, axes)
        axes = None
    if axes is None:
        axes = _detect_axes(shape, what=what, fix=fix, stack=plane is not None)
        reported = axes
    else:
        reported = axes
        axes = axes.upper()
        if len(axes) != len(shape):
            raise InputError(
                f"axes={reported!r} has {len(axes)} letters but {what} has {len(shape)} dims; "
                "give one letter per dim, e.g. 'YX', 'YXC' or 'CYX'."
            )
        if not from_metadata:
            bad = sorted(set(axes) - set("TZCSYX"))
            if bad:
                raise InputError(
                    f"axes={reported!r} contains unknown letters {bad}; use T, Z, C (or S), Y, X."
                )
            reported = axes
    dupes = sorted({a for a in axes if axes.count(a) > 1})
    if dupes:
        raise InputError(f"Axes {reported!r} of {what} repeat {dupes}; each axis may appear once.")
    if "Y" not in axes or "X" not in axes:
        raise InputError(
            f"Axes {reported!r} of {what} must contain both Y and X; pass axes= explicitly, "
            "e.g. axes='CYX'."
        )
    c_dim = _channel_dim(shape, axes, reported=reported, what=what, fix=fix)
    y_dim, x_dim = axes.index("Y"), axes.index("X")
    drop = []
    long = [d for d, s in enumerate(shape) if s != 1 and d not in (y_dim, x_dim, c_dim)]
    if plane is not None:
        plane_dim = _plane_dim(shape, axes, long, plane, reported=reported, what=what)
        long = [d for d in long if d != plane_dim]
    for dim, (letter, size) in enumerate(zip(axes, shape, strict=True)):
        if dim in (y_dim, x_dim, c_dim) or (plane is not None and dim == plane_dim):
            continue
        if size != 1:
            raise InputError(
                f"{what} with axes {reported!r} has {letter}={size}; only Y, X and one channel "
                f"axis may be longer than 1 (supported layouts: YX, YXC, CYX with leading "
                f"singleton T/Z). To use one plane, {fix}."
            )
        drop.append(dim)
    if plane is None or plane_dim is None:
        return _AxesPlan(axes=reported, y=y_dim, x=x_dim, c=c_dim, drop=tuple(drop))
    return _AxesPlan(
        axes=reported, y=y_dim, x=x_dim, c=c_dim, drop=tuple(drop), plane_dim=plane_dim, plane=plane
    )


def _plane_dim(
    shape: tuple[int, ...], axes: str, long: list[int], plane: int, *, reported: str, what: str
) -> int | None:
    """The stack dim that ``plane`` indexes (None for a single image), ``plane`` checked.

    >>> _plane_dim((6, 9, 9), "ZYX", [0], 5, reported="ZYX", what="a"), _plane_dim(
    ...     (9, 9), "YX", [], 0, reported="YX", what="a")
    (0, None)
    """
    stack = [d for d in long if axes[d] in "TZ"]
    if len(stack) > 1:
        sizes = ", ".join(f"{axes[d]}={shape[d]}" for d in stack)
        raise InputError(
            f"{what} with axes {reported!r} has {sizes}; plane= indexes one stack axis (Z or T) "
            "and the others must have length 1. Select a single series first."
        )
    if not stack:
        if plane != 0:
            raise InputError(
                f"plane={plane} is out of range: {what} is a single image (no Z or T axis longer "
                "than 1); pass plane=0 or leave it out."
            )
        return None
    n = shape[stack[0]]
    if plane >= n:
        raise InputError(
            f"plane={plane} is out of range: {what} has {n} planes along {axes[stack[0]]}; pass "
            f"plane= between 0 and {n - 1}."
        )
    return stack[0]


def _channel_dim(
    shape: tuple[int, ...], axes: str, *, reported: str, what: str, fix: str
) -> int | None:
    """The source dim of the channels: C or tifffile's S (samples); if both, one is a singleton."""
    c_letters = [a for a in "SC" if a in axes]
    if len(c_letters) == 2:
        s_len, c_len = shape[axes.index("S")], shape[axes.index("C")]
        if s_len > 1 and c_len > 1:
            raise InputError(
                f"{what} has both samples (S={s_len}) and channels (C={c_len}) with axes "
                f"{reported!r}; only one channel axis is supported: {fix}."
            )
        c_letters = ["S"] if s_len > 1 else ["C"]
    return axes.index(c_letters[0]) if c_letters else None


def _detect_axes(shape: tuple[int, ...], *, what: str, fix: str, stack: bool = False) -> str:
    """Guess the axes of a shape without metadata (leading singletons are T/Z).

    With ``stack`` (a plane of a stack is asked for) leading dims may be longer than 1 (Z, or T
    and Z), and a 3-D shape whose first dim is no channel count but shorter than Y and X is ZYX.

    >>> _detect_axes((6, 64, 64), what="a", fix="", stack=True)
    'ZYX'
    """
    if len(shape) > 5:
        raise InputError(
            f"{what} has {len(shape)} dims; at most 5 (T, Z, C, Y, X) are supported. {fix}, "
            "or pass axes= for a layout with singleton extra dims."
        )
    if len(shape) == 2:
        return "YX"
    lead = shape[:-3]
    if any(s != 1 for s in lead) and not stack:
        raise InputError(
            f"{what} has leading dims {lead} that are not singletons; supported layouts are YX, "
            f"YXC and CYX with leading singleton T/Z. To use one plane, {fix}."
        )
    prefix = "TZ"[2 - len(lead) :] if lead else ""
    first, last = shape[-3], shape[-1]
    if last in (1, 2, 3, 4):
        return prefix + "YXC"
    if first in (1, 2, 3, 4):
        return prefix + "CYX"
    if stack and not lead and first < min(shape[1:]):
        return "ZYX"
    raise InputError(
        f"{what} is ambiguous: neither its first nor its last of 3 dims is a channel count "
        "(1-4). Pass axes= explicitly, e.g. axes='CYX' or axes='ZYX' (with a singleton Z)."
    )


def _raw_chunks(
    shape: Sequence[int],
    plan: _AxesPlan,
    src_chunks: Sequence[int] | None,
    chunks_yx: tuple[int, int] | None,
) -> tuple[int, ...]:
    """Dask chunk sizes in source dim order: y/x per policy, channels whole, others 1."""
    out = []
    for dim, size in enumerate(shape):
        if dim in (plan.y, plan.x):
            if chunks_yx is not None:
                n = chunks_yx[0] if dim == plan.y else chunks_yx[1]
            elif src_chunks is not None:
                n = _sane_chunk_px(int(src_chunks[dim]))
            else:
                n = DEFAULT_CHUNK_PX
            out.append(max(1, min(n, size)))
        elif dim == plan.c:
            out.append(size)
        else:
            out.append(1)
    return tuple(out)


def _sane_chunk_px(src: int) -> int:
    """Chunk side near a source chunk side ``src``, within [MIN_CHUNK_PX, MAX_CHUNK_PX].

    Small source chunks are grouped (a multiple of ``src``), large ones split evenly.

    Examples
    --------
    >>> _sane_chunk_px(256), _sane_chunk_px(1000), _sane_chunk_px(100), _sane_chunk_px(10000)
    (512, 1000, 600, 3334)
    """
    if src < MIN_CHUNK_PX:
        return src * math.ceil(MIN_CHUNK_PX / src)
    if src > MAX_CHUNK_PX:
        return math.ceil(src / math.ceil(src / MAX_CHUNK_PX))
    return src


def _to_yxc(arr: da.Array, plan: _AxesPlan) -> da.Array:
    """Lazily drop singleton dims (and pick the plane of a stack), transpose to ``(y, x, c)``."""
    gone = (*plan.drop, *(() if plan.plane_dim is None else (plan.plane_dim,)))
    if gone:
        arr = arr[
            tuple(
                plan.plane if d == plan.plane_dim else 0 if d in gone else slice(None)
                for d in range(arr.ndim)
            )
        ]
    keep = [d for d in range(len(plan.axes)) if d not in gone]
    order = [keep.index(plan.y), keep.index(plan.x)]
    if plan.c is not None:
        order.append(keep.index(plan.c))
    if order != list(range(len(order))):
        arr = arr.transpose(order)
    if plan.c is None:
        arr = arr[:, :, None]
    return arr


def _open_chunked(
    lazy: Any,
    *,
    what: str,
    path: Path,
    fmt: str,
    axes: str | None,
    meta_axes: str | None,
    src_chunks: tuple[int, ...],
    chunks_yx: tuple[int, int] | None,
    level: int,
    pixel_size: tuple[float, float] | None,
    unit: str | None,
    plane: int | None = None,
) -> OpenedImage:
    """The shared end of the chunked-file readers (Zarr, TIFF): check, plan axes, wrap lazily.

    ``lazy`` is a picklable array recipe (``_ZarrArray``, ``_TiffArray``) with ``shape`` and
    ``dtype``; ``axes`` (the caller's) wins over ``meta_axes`` (the file's).
    """
    _check_dtype(lazy.dtype, what)
    plan = _plan_axes(
        lazy.shape,
        axes if axes is not None else meta_axes,
        from_metadata=axes is None and meta_axes is not None,
        what=what,
        fix=_FILE_PLANE_FIX,
        plane=plane,
    )
    data = _from_lazy(lazy, _raw_chunks(lazy.shape, plan, src_chunks, chunks_yx), fmt)
    return _finish(
        _to_yxc(data, plan),
        path=str(path),
        fmt=fmt,
        axes=plan.axes,
        level=level,
        pixel_size=pixel_size,
        unit=unit,
        plane=plan.plane_info(lazy.shape),
    )
