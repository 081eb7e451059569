"""Which source channels the model sees: up to three picked channels, mapped to R, G and B.

The backbones take 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels. An image with
more (fluorescence, multiplexed imaging) needs ``channels``: up to three source channels, in
the order R, G, B. One picked channel is a gray image; two are R and G, with B zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import dask.array as da

from hrdv2_dask.errors import InputError

from ._base import ImageMeta, OpenedImage, _is_int

__all__ = ["MAX_CHANNELS", "check_channel_count", "select_channels"]

#: The most channels an image may have without ``channels`` (RGBA).
MAX_CHANNELS = 4
_FIX = "pick up to three, mapped to R, G, B in that order, with --channels (Python, YAML: channels)"


def _listed(n: int) -> str:
    """The channel indices of an image of ``n`` channels, for a message.

    >>> _listed(5), _listed(40)
    ('0, 1, 2, 3, 4', '0..39')
    """
    return ", ".join(str(k) for k in range(n)) if n <= 16 else f"0..{n - 1}"


def _name(meta: ImageMeta) -> str:
    return repr(meta.path) if meta.path else f"the {meta.format} image"


def check_channel_count(meta: ImageMeta) -> None:
    """Refuse an image of more than :data:`MAX_CHANNELS` channels (none picked), in one line.

    >>> meta = ImageMeta(path="/a.tif", format="tiff", shape=(8, 8, 5), dtype="uint16", axes="CYX")
    >>> check_channel_count(meta)
    Traceback (most recent call last):
    ...
    hrdv2_dask.errors.InputError: '/a.tif' has 5 channels (0, 1, 2, 3, 4) and the model takes at most 4; pick up to three, mapped to R, G, B in that order, with --channels (Python, YAML: channels), e.g. --channels 0,1,2.
    """  # noqa: E501
    n = meta.shape[2]
    if n > MAX_CHANNELS and meta.channels is None:
        raise InputError(
            f"{_name(meta)} has {n} channels ({_listed(n)}) and the model takes at most "
            f"{MAX_CHANNELS}; {_FIX}, e.g. --channels 0,1,2."
        )


def select_channels(image: OpenedImage, channels: Sequence[int]) -> OpenedImage:
    """The opened ``image`` with only ``channels`` (in that order; two get a zero third).

    Parameters
    ----------
    image : OpenedImage
        From :func:`~hrdv2_dask.io.readers.open_image`.
    channels : sequence of int
        One to three distinct indices of the image's channels.

    Returns
    -------
    OpenedImage
        ``data`` of 1 or 3 channels (lazy); ``meta`` with that shape and ``channels`` set.

    Examples
    --------
    >>> import numpy as np
    >>> from hrdv2_dask.io.readers import open_image
    >>> data, meta = select_channels(open_image(np.arange(10.0).reshape(1, 2, 5), "YXC"), [4, 1])
    >>> data.compute().tolist(), meta.channels, meta.shape
    ([[[4.0, 1.0, 0.0], [9.0, 6.0, 0.0]]], (4, 1), (1, 2, 3))
    """
    data, meta = image
    picked = tuple(channels)
    n = meta.shape[2]
    if not 1 <= len(picked) <= 3 or not all(_is_int(c) for c in picked):
        raise InputError(
            f"channels must be one to three channel indices (R, G, B), got {list(picked)!r}; "
            f"{_name(meta)} has channels {_listed(n)}."
        )
    picked = tuple(int(c) for c in picked)
    bad = [c for c in picked if not 0 <= c < n]
    if bad or len(set(picked)) < len(picked):
        what = f"channel {bad[0]} does not exist" if bad else "a channel is picked twice"
        raise InputError(
            f"channels={','.join(map(str, picked))}: {what} in {_name(meta)}, which has "
            f"{n} channel{'s' if n > 1 else ''} ({_listed(n)}); pick distinct ones of these."
        )
    out = data[..., list(picked)]
    if len(picked) == 2:
        out = da.concatenate([out, da.zeros_like(out[..., :1])], axis=-1)
    meta = replace(meta, shape=(*meta.shape[:2], out.shape[-1]), channels=picked)
    return OpenedImage(out, meta)
