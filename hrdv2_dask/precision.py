"""Backbone arithmetic: which precision ``"auto"`` means on a device, and the autocast for it.

``auto`` is bf16 autocast (fp32 accumulation, fp32 outputs) on CUDA and on CPUs that execute
bf16 natively (AVX512-BF16 or AMX, read from torch's CPU checks or the kernel's CPU flags, never
guessed from the vendor), fp32 elsewhere. Before ``precision`` existed the package ran bf16 on
CUDA and fp32 on every CPU (the *legacy* rule): stores record a precision only where it differs
from that rule, so stores written before keep their settings (and resume).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from .config import PRECISIONS
from .errors import ConfigError

__all__ = ["autocast", "cpu_has_native_bf16", "recorded_precision", "resolve_precision"]

#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles).

    torch's own checks first (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``
    where this torch has them), then the kernel's CPU flags.
    """
    import torch

    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, check, None)
        if fn is not None and fn():
            return True
    return bool(_cpuinfo_flags() & set(BF16_FLAGS))


def _check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; 'auto' picks "
            "bf16 where the device has it natively."
        )
    return precision


def resolve_precision(precision: str, device: str) -> str:
    """``"fp32"`` or ``"bf16"``: what ``precision`` means on ``device`` (``"cpu"``, ``"cuda:N"``).

    >>> resolve_precision("fp32", "cuda"), resolve_precision("auto", "cuda:1")
    ('fp32', 'bf16')
    """
    _check(precision)
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _legacy(device: str) -> str:
    return "bf16" if str(device).startswith("cuda") else "fp32"


def recorded_precision(precision: str, device: str) -> tuple[str, str | None]:
    """``(what the workers run, what the store records)`` for a requested precision.

    Resolved once, on the client, for the device it names (``"auto"``: as this process sees it),
    so every worker runs the same arithmetic and a run resumes whichever cluster runs it. The
    record is ``None`` (nothing recorded) where the result is what the package did before
    ``precision`` existed (bf16 on CUDA, fp32 on CPUs).

    >>> recorded_precision("fp32", "cpu")
    ('fp32', None)
    >>> recorded_precision("bf16", "cpu")
    ('bf16', 'bf16')
    >>> recorded_precision("fp32", "cuda:0")
    ('fp32', 'fp32')
    """
    _check(precision)
    device = str(device)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    run = resolve_precision(precision, device)
    return run, None if run == _legacy(device) else run


def autocast(precision: str, device):
    """The context the backbone runs in: bf16 autocast (fp32 accumulation) or nothing."""
    import torch

    device = torch.device(device)
    if resolve_precision(precision, str(device)) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
