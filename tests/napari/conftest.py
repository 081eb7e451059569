"""A real napari viewer with this checkout's plugin, for the viewer tests.

They need napari, pytest-qt and a display (``xvfb-run -a python -m pytest tests/napari``) and
skip cleanly without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MANIFEST = Path(__file__).resolve().parents[2] / "hrdv2_dask" / "napari.yaml"


@pytest.fixture
def plugin_viewer(request):
    """A ``napari.Viewer`` (pytest-qt's ``make_napari_viewer``) that knows the plugin."""
    pytest.importorskip("napari", exc_type=ImportError)  # also a napari whose Qt is broken
    pytest.importorskip("pytestqt")
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        pytest.skip("no display: run under xvfb-run")
    import npe2

    pm = npe2.PluginManager.instance()
    if "hrdv2-dask" not in pm._manifests:  # an install without this checkout's entry point
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return request.getfixturevalue("make_napari_viewer")()
