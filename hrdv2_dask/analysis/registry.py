"""The table of analyses: each one registers its options, help line and run function here.

An analysis module decorates its run function::

    @register("pca", PCAOptions, help="PCA picture ...", function=fit_pca)
    def run_pca(options: PCAOptions, features: xr.DataArray, out: Path) -> dict: ...

and :mod:`hrdv2_dask.analysis` imports that module, so adding an analysis touches one module
(plus that import). The command line builds one subcommand per record (its arguments from the
options class) and workflows look analyses up with :func:`get_analysis`; neither has a list of
analyses of its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from ..config import Settings
from ..errors import ConfigError

__all__ = ["ANALYSES", "Analysis", "RunFunction", "get_analysis", "register"]

#: ``run(options, features, out) -> summary``: writes the outputs under ``out`` (an existing
#: folder) and returns a JSON-able summary naming the files written.
RunFunction = Callable[[Any, xr.DataArray, Path], dict]


@dataclass(frozen=True)
class Analysis:
    """One registered analysis.

    Parameters
    ----------
    name : str
        The YAML key (``analyses: [{pca: {...}}]``) and the subcommand (``hrdv2 pca``).
    options : type of Settings
        Its frozen options dataclass; ``options.SECTION == name``.
    help : str
        One line for the command-line subcommand.
    run : callable
        ``run(options, features, out) -> dict``: runs it on an opened ``(feature, y, x)``
        array, writes Zarr/PNG files under the folder ``out`` and returns a summary that
        names them.
    function : callable
        The Python function whose keyword options ``options`` defines (e.g. ``fit_pca``).
    """

    name: str
    options: type[Settings]
    help: str
    run: RunFunction
    function: Callable[..., Any]


#: ``name -> Analysis``, filled by :func:`register` when :mod:`hrdv2_dask.analysis` is imported.
ANALYSES: dict[str, Analysis] = {}


def register(
    name: str, options: type[Settings], *, help: str, function: Callable[..., Any]
) -> Callable[[RunFunction], RunFunction]:
    """Decorator that records ``run`` as the analysis ``name`` (returned unchanged).

    Raises
    ------
    ConfigError
        ``name`` is taken, or ``options.SECTION`` is not ``name`` (its messages would name
        another section).
    """

    def decorate(run: RunFunction) -> RunFunction:
        if name in ANALYSES:
            raise ConfigError(
                f"The analysis {name!r} is registered twice ({ANALYSES[name].run.__module__} "
                f"and {run.__module__}); give the new one another name."
            )
        if options.SECTION != name:
            raise ConfigError(
                f"{options.__name__}.SECTION is {options.SECTION!r} but it is registered as "
                f"the analysis {name!r}; set SECTION = {name!r}."
            )
        ANALYSES[name] = Analysis(name, options, help, run, function)
        return run

    return decorate


def get_analysis(name: Any, where: str = "analyses") -> Analysis:
    """The registered analysis ``name``; ``where`` says where the name was read (for messages).

    Examples
    --------
    >>> get_analysis("pca").options().components
    3
    >>> get_analysis("pcaa", "analyses[0]")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hrdv2_dask.errors.ConfigError: Unknown analysis 'pcaa' in analyses[0]. Did you mean 'pca'? ...
    """
    if isinstance(name, str) and name in ANALYSES:
        return ANALYSES[name]
    hint = difflib.get_close_matches(str(name), list(ANALYSES), n=1)
    extra = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(f"Unknown analysis {name!r} in {where}.{extra} Known: {sorted(ANALYSES)}.")
