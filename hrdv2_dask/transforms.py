"""Small invertible image transforms for the HR-Dv2 ensemble.

A transform changes an image ``(..., H, W)`` and knows where every pixel of the original image
went: :meth:`Transform.map_coords` takes pixel coordinates in the original image and returns
their coordinates in the transformed image. The ensemble uses that map to undo the transform on
feature maps exactly, at any output resolution, by sampling each transformed view's features at
the place where each output pixel went (rather than resizing first and undoing afterwards, which
is only exact on the pixel grid).

Coordinates follow the convention of the rest of the package: pixel ``i`` has its centre at
``i`` and a patch covering pixels ``[a, a + P)`` has its centre at ``a + (P - 1) / 2``.

Composite transforms apply their steps in order and map coordinates through every step, so
shift-then-flip is undone in the right order by construction.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .tiling import reflect_index

__all__ = [
    "AxisCoords",
    "Compose",
    "Flip",
    "Rotate",
    "Shift",
    "Transform",
    "TransformSet",
    "combine",
    "flips",
    "rotations",
    "shifts",
]

Boundary = Literal["reflect", "periodic"]
Neighbourhood = Literal["moore", "von_neumann"]

_NEIGHBOURHOODS: dict[str, tuple[tuple[int, int], ...]] = {
    "von_neumann": ((-1, 0), (0, -1), (0, 1), (1, 0)),
    "moore": ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


@dataclass(frozen=True)
class AxisCoords:
    """Coordinates of one output axis, expressed on one axis of a (transformed) image.

    Parameters
    ----------
    axis : int
        Axis of the transformed image (0 = y, 1 = x) that ``values`` live on.
    values : numpy.ndarray
        1-D float64 pixel coordinates.
    """

    axis: int
    values: np.ndarray


class Transform:
    """An invertible image transform.

    Subclasses implement :meth:`apply` on tensors ``(..., H, W)``, :meth:`output_shape` and
    :meth:`map_coords`.
    """

    def apply(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape ``(H, W)`` of the transformed image for an input of ``shape``."""
        return shape

    def map_coords(
        self, coords: tuple[AxisCoords, AxisCoords], shape: tuple[int, int]
    ) -> tuple[AxisCoords, AxisCoords]:  # pragma: no cover - abstract
        """Map coordinates in an image of ``shape`` to coordinates in the transformed image."""
        raise NotImplementedError

    def inverse(self) -> Transform:  # pragma: no cover - abstract
        """The transform that undoes this one on images (exactly, but for reflected borders)."""
        raise NotImplementedError

    @property
    def steps(self) -> tuple[Transform, ...]:
        return (self,)

    @property
    def max_shift_px(self) -> int:
        """Largest absolute shift in pixels, used to size the border that shifts contaminate."""
        return 0


@dataclass(frozen=True)
class Shift(Transform):
    """Translate the image content by ``(dy, dx)`` pixels.

    The pixel at ``(y, x)`` moves to ``(y + dy, x + dx)``. ``boundary="reflect"`` fills the
    uncovered border by mirroring (no wrap-around); ``"periodic"`` rolls the image as
    :func:`torch.roll` does, as in the original HR-Dv2 proposal.
    """

    dy: int
    dx: int
    boundary: Boundary = "reflect"

    def __post_init__(self) -> None:
        if self.boundary not in ("reflect", "periodic"):
            raise ConfigError(
                f"Shift boundary must be 'reflect' or 'periodic', got {self.boundary!r}."
            )
        for name, value in (("dy", self.dy), ("dx", self.dx)):
            if int(value) != value:
                raise ConfigError(
                    f"Shift {name} must be an integer number of pixels, got {value!r}."
                )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.dy == 0 and self.dx == 0:
            return images
        if self.boundary == "periodic":
            return torch.roll(images, shifts=(self.dy, self.dx), dims=(-2, -1))
        h, w = images.shape[-2:]
        rows = torch.as_tensor(reflect_index(np.arange(h) - self.dy, h), device=images.device)
        cols = torch.as_tensor(reflect_index(np.arange(w) - self.dx, w), device=images.device)
        return images.index_select(-2, rows).index_select(-1, cols)

    def map_coords(self, coords, shape):
        delta = (self.dy, self.dx)
        out = []
        for c in coords:
            v = c.values + delta[c.axis]
            if self.boundary == "periodic":
                v = np.mod(v, shape[c.axis])
            out.append(AxisCoords(c.axis, v))
        return tuple(out)

    def inverse(self) -> Shift:
        return Shift(-self.dy, -self.dx, self.boundary)

    @property
    def max_shift_px(self) -> int:
        return max(abs(self.dy), abs(self.dx))

    def __str__(self) -> str:
        return f"shift({self.dy:+d},{self.dx:+d},{self.boundary})"


@dataclass(frozen=True)
class Flip(Transform):
    """Mirror the image along ``axis`` ("y": upside down, "x": left-right)."""

    axis: Literal["y", "x"]

    def __post_init__(self) -> None:
        if self.axis not in ("y", "x"):
            raise ConfigError(f"Flip axis must be 'y' or 'x', got {self.axis!r}.")

    @property
    def _dim(self) -> int:
        return 0 if self.axis == "y" else 1

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flip(images, dims=(-2 + self._dim,))

    def map_coords(self, coords, shape):
        d = self._dim
        return tuple(
            AxisCoords(c.axis, shape[d] - 1 - c.values) if c.axis == d else c for c in coords
        )

    def inverse(self) -> Flip:
        return self

    def __str__(self) -> str:
        return f"flip({self.axis})"


@dataclass(frozen=True)
class Rotate(Transform):
    """Rotate by ``k`` quarter turns counter-clockwise, as :func:`torch.rot90` does."""

    k: int

    def __post_init__(self) -> None:
        if self.k not in (1, 2, 3):
            raise ConfigError(f"Rotate k must be 1, 2 or 3 quarter turns, got {self.k!r}.")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return torch.rot90(images, self.k, dims=(-2, -1))

    def output_shape(self, shape):
        return shape if self.k == 2 else (shape[1], shape[0])

    def map_coords(self, coords, shape):
        for _ in range(self.k):
            # One quarter turn maps (y, x) in an (H, W) image to (W - 1 - x, y) in a (W, H) one.
            coords = tuple(
                AxisCoords(0, shape[1] - 1 - c.values) if c.axis == 1 else AxisCoords(1, c.values)
                for c in coords
            )
            shape = (shape[1], shape[0])
        return coords

    def inverse(self) -> Rotate:
        return Rotate(4 - self.k)

    def __str__(self) -> str:
        return f"rot90(k={self.k})"


@dataclass(frozen=True)
class Compose(Transform):
    """Apply ``transforms`` in order; the empty composition is the identity."""

    transforms: tuple[Transform, ...] = ()

    def __post_init__(self) -> None:
        flat: list[Transform] = []
        for t in self.transforms:
            flat.extend(t.steps)
        object.__setattr__(self, "transforms", tuple(flat))

    @property
    def steps(self) -> tuple[Transform, ...]:
        return self.transforms

    def apply(self, images):
        for t in self.transforms:
            images = t.apply(images)
        return images

    def output_shape(self, shape):
        for t in self.transforms:
            shape = t.output_shape(shape)
        return shape

    def map_coords(self, coords, shape):
        for t in self.transforms:
            coords = t.map_coords(coords, shape)
            shape = t.output_shape(shape)
        return coords

    def inverse(self) -> Compose:
        return Compose(tuple(t.inverse() for t in reversed(self.transforms)))

    @property
    def max_shift_px(self) -> int:
        return max((t.max_shift_px for t in self.transforms), default=0)

    def __str__(self) -> str:
        return "identity" if not self.transforms else "∘".join(str(t) for t in self.transforms)


IDENTITY = Compose()


def _signature(t: Transform) -> tuple:
    """What a transform does to a small non-square index image: equal signatures, same transform."""
    image = torch.arange(17 * 19, dtype=torch.float64).reshape(1, 17, 19)
    out = t.apply(image)
    return (tuple(out.shape), out.numpy().tobytes())


class TransformSet(Sequence[Compose]):
    """An ordered set of transforms, identity first, each transform counted once.

    Parameters
    ----------
    transforms : iterable of Transform
        Transforms to include; duplicates (transforms with the same effect, such as two
        half turns or a flip applied twice) and extra identities are dropped.
    """

    def __init__(self, transforms: Iterable[Transform] = ()) -> None:
        items = [IDENTITY]
        seen = {_signature(IDENTITY)}
        for t in transforms:
            t = t if isinstance(t, Compose) else Compose((t,))
            sig = _signature(t)
            if sig not in seen:
                seen.add(sig)
                items.append(t)
        self._items = tuple(items)

    def __getitem__(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Compose]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransformSet) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    @property
    def max_shift_px(self) -> int:
        """Largest shift of any transform in the set, in pixels."""
        return max(t.max_shift_px for t in self._items)

    def describe(self) -> list[str]:
        """One string per transform, for logs and Zarr attrs."""
        return [str(t) for t in self._items]

    def __repr__(self) -> str:
        return f"TransformSet({self.describe()})"


def shifts(
    magnitudes: int | Sequence[int] = (1,),
    neighbourhood: Neighbourhood = "moore",
    boundary: Boundary = "reflect",
    *,
    patch_size: int = 14,
) -> TransformSet:
    """Integer pixel shifts in the 4 (von Neumann) or 8 (Moore) directions.

    Parameters
    ----------
    magnitudes : int or sequence of int, optional
        Shift lengths in pixels, each ``1 <= n < patch_size / 2``.
    neighbourhood : {"moore", "von_neumann"}, optional
        8 directions (diagonals included) or 4.
    boundary : {"reflect", "periodic"}, optional
        How the uncovered border is filled: mirrored, or wrapped around as ``torch.roll``.
    patch_size : int, optional
        Patch size of the backbone the shifts are meant for (14 for DINOv2, 16 for DINOv3).

    Returns
    -------
    TransformSet
        Identity first, then ``len(magnitudes) * (4 or 8)`` shifts.

    Examples
    --------
    >>> len(shifts()), len(shifts((1, 2))), len(shifts(1, "von_neumann"))
    (9, 17, 5)
    """
    if isinstance(magnitudes, int):
        magnitudes = (magnitudes,)
    if neighbourhood not in _NEIGHBOURHOODS:
        raise ConfigError(
            f"neighbourhood must be one of {sorted(_NEIGHBOURHOODS)}, got {neighbourhood!r}."
        )
    mags = list(magnitudes)
    if not mags:
        raise ConfigError("shifts() needs at least one magnitude, e.g. magnitudes=(1, 2).")
    for n in mags:
        if int(n) != n or not 1 <= n < patch_size / 2:
            raise ConfigError(
                f"shift magnitude {n!r} is invalid: shifts must be integers with "
                f"1 <= n < patch_size / 2 = {patch_size / 2:g} px."
            )
    return TransformSet(
        Shift(int(n) * dy, int(n) * dx, boundary)
        for n in mags
        for dy, dx in _NEIGHBOURHOODS[neighbourhood]
    )


def flips() -> TransformSet:
    """Identity, left-right and upside-down mirror images.

    >>> flips().describe()
    ['identity', 'flip(x)', 'flip(y)']
    """
    return TransformSet([Flip("x"), Flip("y")])


def rotations() -> TransformSet:
    """Identity and the three quarter-turn rotations.

    >>> len(rotations())
    4
    """
    return TransformSet(Rotate(k) for k in (1, 2, 3))


def combine(*sets: Iterable[Transform]) -> TransformSet:
    """Every combination of one transform from each set, applied in the order of the sets.

    Parameters
    ----------
    *sets : TransformSet or iterable of Transform
        Each set is taken to include the identity, so single sets survive whole.

    Examples
    --------
    >>> len(combine(shifts(), flips()))
    27
    >>> len(combine(flips(), rotations()))  # the 8 symmetries of a square
    8
    """
    if not sets:
        raise ConfigError("combine() needs at least one transform set.")
    pools = [list(TransformSet(s)) for s in sets]
    return TransformSet(Compose(tuple(parts)) for parts in itertools.product(*pools))


def grid_coords(n_px: int, out_stride: int) -> np.ndarray:
    """Centre coordinates, in pixels, of the output cells along an axis of ``n_px`` pixels.

    Cell ``j`` covers pixels ``[j * out_stride, (j + 1) * out_stride)``.

    >>> grid_coords(5, 2).tolist()
    [0.5, 2.5, 4.5]
    """
    n_out = -(-n_px // out_stride)
    return np.arange(n_out, dtype=np.float64) * out_stride + (out_stride - 1) / 2


def pad_reflect(images: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Pad ``images (..., H, W)`` at the bottom and right to ``shape`` by mirroring.

    Works for any amount of padding (the mirror repeats), unlike ``F.pad(mode="reflect")``.
    """
    h, w = images.shape[-2:]
    if (h, w) == tuple(shape):
        return images
    if h > 1 and w > 1 and shape[0] - h < h and shape[1] - w < w and images.dim() in (3, 4):
        return F.pad(images, (0, shape[1] - w, 0, shape[0] - h), mode="reflect")
    rows = torch.as_tensor(reflect_index(np.arange(shape[0]), h), device=images.device)
    cols = torch.as_tensor(reflect_index(np.arange(shape[1]), w), device=images.device)
    return images.index_select(-2, rows).index_select(-1, cols)
