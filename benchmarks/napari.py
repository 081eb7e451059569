"""``napari`` suite: the viewer's responsiveness on a gigapixel feature store (GUI-thread stalls).

A synthetic feature store of a ``--source-px``² px source (100k × 100k by default; at
``--out-stride`` 4, 25,000² cells of ``--dim`` float16 features in a run's chunk grid; see
:mod:`benchmarks.napari_store`: a few distinct chunks, the rest hard links) is opened in a real
napari viewer (it needs a display: ``xvfb-run -a python -m benchmarks napari``) with the
plugin's reader, then a scripted list of named actions runs: open, full view, zoom in to one
output cell per screen pixel, pan across several screens, zoom out. A ``QTimer`` heartbeat
every ``--heartbeat-ms`` records when the GUI thread is free; for each action:

* ``stall``: the longest gap between heartbeats (the GUI thread's longest freeze) and the 99th
  percentile of the gaps, from the action to the last redraw;
* ``drawn``: seconds from the action to the last redraw once every layer shows the tile of
  the current view (for ``open``: the time to first draw of the data).

Each napari slicing mode runs in its own process (``--modes``): ``sync`` (napari's default:
layers are sliced on the GUI thread) and ``async`` (napari's experimental asynchronous
slicing, ``NAPARI_ASYNC=1``: slicing in a worker thread). Actions are ``(name, callable)``
pairs taking the :class:`Session` (:func:`default_actions`); then the dock widget's
(:func:`widget_actions`: click a similarity point, pan over the lazy full result, paint two
classes and train, PCA), each done when its thread worker has finished and its layers are drawn.
``--quick``: a 8000² px source, 16 features, two pans, results shown lazily (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import BackboneSpec, Column, environment, environment_line, markdown_table

__all__ = [
    "Action",
    "Session",
    "add_arguments",
    "default_actions",
    "gap_stats",
    "widget_actions",
    "run",
    "run_session",
    "to_markdown",
]

log = logging.getLogger(__name__)

#: A named step of a scripted session: ``(name, fn(session))``, run on the GUI thread.
Action = tuple[str, Callable[["Session"], None]]

_VERSIONED = ("napari", "vispy", "PyQt6", "npe2", "dask", "zarr")


@dataclass
class Session:
    """What an action gets: the viewer, the store and the timing records."""

    viewer: Any
    store: Path
    plugin: str = "hrdv2-dask"
    beats: list[float] = field(default_factory=list)
    draws: list[float] = field(default_factory=list)
    widget: Any = None  # the plugin's dock widget, once an action opened it
    shows: list[tuple[float, float, bool]] = field(default_factory=list)  # (t0, ms, added)

    @property
    def busy(self) -> bool:
        """Whether the widget runs a step (its thread worker)."""
        return bool(self.widget is not None and self.widget.busy)

    @property
    def canvas(self) -> tuple[int, int]:
        """``(height, width)`` of the canvas in screen pixels."""
        native = self.viewer.window._qt_viewer.canvas.native
        return int(native.height()), int(native.width())

    def cell_zoom(self) -> float:
        """Camera zoom at which one output cell of the top layer is one screen pixel."""
        return 1.0 / float(self.viewer.layers[-1].scale[-1])


def gap_stats(beats: Sequence[float], t0: float, t1: float) -> dict[str, float | None]:
    """Longest and 99th-percentile gap (ms) between heartbeats around ``[t0, t1]`` (the beat
    before ``t0`` to the first after ``t1``: a freeze across either end counts whole).

    >>> gap_stats([0.0, 0.01, 0.02, 0.25, 0.26], 0.015, 0.255)["max_ms"]
    230.0
    """
    b = np.asarray(beats, np.float64)
    lo = max(int(np.searchsorted(b, t0, "right")) - 1, 0)
    hi = min(int(np.searchsorted(b, t1, "left")) + 1, b.size)
    gaps = np.diff(b[lo:hi]) * 1e3
    if gaps.size == 0:
        return {"max_ms": None, "p99_ms": None, "beats": 0}
    return {
        "max_ms": round(float(gaps.max()), 1),
        "p99_ms": round(float(np.percentile(gaps, 99)), 1),
        "beats": int(gaps.size),
    }


# ------------------------------------------------------------------ actions


def _open(session: Session) -> None:
    session.viewer.open(str(session.store), plugin=session.plugin)


def _full_view(session: Session) -> None:
    session.viewer.reset_view()


def _zoom_in(session: Session) -> None:
    cam = session.viewer.camera
    cam.zoom = session.cell_zoom()


def _pan(session: Session, screens: float = 1.0) -> None:
    cam = session.viewer.camera
    y, x = cam.center[-2:]
    cam.center = (y, x + screens * session.canvas[1] / cam.zoom)  # screens to the right


def _pan_back(session: Session) -> None:
    _pan(session, -1.0)


def _redraw(session: Session) -> None:
    session.viewer.window._qt_viewer.canvas._scene_canvas.update()


def _zoom_out(factor: float) -> Callable[[Session], None]:
    def zoom(session: Session) -> None:
        session.viewer.camera.zoom = session.viewer.camera.zoom / factor

    return zoom


def _open_widget(session: Session) -> None:
    from hrdv2_dask.napari._widget import Hrdv2Widget

    widget = session.widget = Hrdv2Widget(session.viewer)
    show = widget._show

    def timed(*args: Any) -> None:  # how long each result layer's add or update takes
        n = len(session.viewer.layers)
        t0 = time.perf_counter()
        show(*args)
        ms = (time.perf_counter() - t0) * 1e3
        session.shows.append((t0, round(ms, 1), len(session.viewer.layers) > n))

    widget._show = timed
    session.viewer.window.add_dock_widget(widget, name="HR-Dv2 analysis")


def _view_centre(session: Session) -> tuple[float, float]:
    y, x = session.viewer.camera.center[-2:]
    return float(y), float(x)


def _centre_zoom_in(session: Session) -> None:
    """The image's centre at one output cell per screen pixel."""
    session.viewer.reset_view()
    session.viewer.camera.zoom = session.cell_zoom()


def _click_point(session: Session) -> None:
    """A query point at the view's centre (the widget's live update starts the similarity)."""
    session.widget.new_points()
    session.viewer.layers["query points"].add([list(_view_centre(session))])


def _paint(session: Session) -> None:
    """Back to the image's centre; a new scribbles layer; class 1 and class 2 strokes half a
    screen apart (other chunks)."""
    widget, viewer = session.widget, session.viewer
    _centre_zoom_in(session)
    widget.new_scribbles()
    layer = viewer.layers["scribbles"]
    y, x = _view_centre(session)
    half = session.canvas[1] / viewer.camera.zoom / 4  # a quarter screen, in world units
    for label, dx in ((1, -half), (2, half)):
        cy, cx = (int(round(v)) for v in layer.world_to_data((y, x + dx))[-2:])
        r = max(2, int(half / float(layer.scale[-1]) / 8))
        layer.data[max(cy - r, 0) : cy + r, max(cx - 4 * r, 0) : cx + 4 * r] = label
        log.info("class %d painted at data (%d, %d), half-height %d", label, cy, cx, r)
    layer.refresh()


def _train(session: Session) -> None:
    session.widget.run_segment()


def _pca(session: Session) -> None:
    session.widget.run_pca()


def widget_actions(pans: int = 2) -> list[Action]:
    """The dock widget on the store, at one output cell per screen pixel: open it, click a
    similarity point (the view, then the lazy full result), pan ``pans`` screens over it,
    paint two classes, train + segment (the view first), PCA."""
    return [
        ("widget: open", _open_widget),
        ("widget: centre, zoom in (1 cell per screen px)", _centre_zoom_in),
        ("similarity: click a point", _click_point),
        *[(f"similarity: pan one screen ({k + 1})", _pan) for k in range(pans)],
        ("scribbles: centre, new layer, paint two classes", _paint),
        ("train + segment", _train),
        ("PCA", _pca),
    ]


def default_actions(pans: int = 4) -> list[Action]:
    """A redraw of the empty canvas (the renderer's own cost, the baseline), open, full view,
    zoom in (1 cell per screen px), ``pans`` screens right, one back (seen before), zoom out
    4x."""
    return [
        ("redraw, empty viewer (baseline)", _redraw),
        ("open", _open),
        ("full view", _full_view),
        ("zoom in (1 cell per screen px)", _zoom_in),
        *[(f"pan one screen ({k + 1})", _pan) for k in range(pans)],
        ("pan back one screen (seen before)", _pan_back),
        ("zoom out 4x", _zoom_out(4.0)),
    ]


# ------------------------------------------------------------------ one session


def _register_plugin() -> None:
    import npe2

    pm = npe2.PluginManager.instance()
    if "hrdv2-dask" not in pm._manifests:  # an install without this checkout's entry point
        manifest = Path(__file__).resolve().parents[1] / "hrdv2_dask" / "napari.yaml"
        pm.register(npe2.PluginManifest.from_file(manifest))


def _pump(app: Any, until: Callable[[], bool], timeout: float) -> bool:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        app.processEvents()
        if until():
            return True
        time.sleep(0.0005)
    return False


def run_session(
    store: str | os.PathLike,
    *,
    actions: Sequence[Action],
    mode: str = "sync",
    canvas: tuple[int, int] = (1024, 1280),
    heartbeat_ms: int = 5,
    quiet_s: float = 0.4,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Run ``actions`` in a fresh napari viewer on the GUI thread; one row per action.

    ``mode``: ``sync`` or ``async`` napari slicing. An action is done when every layer is
    loaded and no redraw came for ``quiet_s``; its ``drawn_s`` is the last redraw's time.
    """
    from napari.settings import get_settings

    get_settings().experimental.async_ = mode == "async"
    import napari
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QApplication

    _register_plugin()
    t_import = time.perf_counter()
    import hrdv2_dask.napari._reader  # noqa: F401  (once a session: not part of "open")

    import_s = time.perf_counter() - t_import
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    session = Session(viewer=viewer, store=Path(store))
    qt_viewer = viewer.window._qt_viewer
    qt_viewer.canvas._scene_canvas.events.draw.connect(  # after napari's slicing and drawing
        lambda _e: session.draws.append(time.perf_counter()), position="last"
    )
    window = viewer.window._qt_window
    window.resize(canvas[1] + 80, canvas[0] + 160)
    _pump(app, lambda: False, 1.0)  # the window up and drawn once
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.timeout.connect(lambda: session.beats.append(time.perf_counter()))
    timer.start(heartbeat_ms)
    rows = []
    try:
        for name, fn in actions:
            _pump(app, lambda: False, 0.2)
            n_draws = len(session.draws)
            t0 = time.perf_counter()
            fn(session)
            called = time.perf_counter()

            unloaded: list[float] = []

            def settled(n_draws=n_draws, t0=t0, unloaded=unloaded) -> bool:
                layers_ready = all(_shows_current_view(layer) for layer in viewer.layers)
                if not layers_ready and not unloaded:
                    unloaded.append(time.perf_counter() - t0)
                drew = len(session.draws) > n_draws
                quiet = time.perf_counter() - (session.draws[-1] if drew else t0) > quiet_s
                return layers_ready and drew and quiet and not session.busy

            done = _pump(app, settled, timeout_s)
            t1 = session.draws[-1] if len(session.draws) > n_draws else time.perf_counter()
            row = {
                "action": name,
                "mode": mode,
                "call_ms": round((called - t0) * 1e3, 1),
                "drawn_s": round(t1 - t0, 3) if done else None,
                "timed_out": not done,
                "unloaded_after_s": round(unloaded[0], 3) if unloaded else None,
                **gap_stats(session.beats, t0, t1),
                "level": _levels(viewer),
                **_widget_row(session, t0),
            }
            log.info("%s %s: %s", mode, name, row)
            rows.append(row)
    finally:
        timer.stop()
        canvas_size = session.canvas
        viewer.close()
    return {
        "mode": mode,
        "canvas": list(canvas_size),
        "plugin_import_s": round(import_s, 2),
        "rows": rows,
    }


def _widget_row(session: Session, t0: float) -> dict[str, Any]:
    """The widget's error and status after an action (when it is open), and the GUI-thread
    milliseconds of each result layer's add (``add_ms``) or in-place update (``update_ms``)."""
    if session.widget is None:
        return {}
    shows = [(ms, added) for t, ms, added in session.shows if t >= t0]
    return {
        "widget_error": session.widget.last_error,
        "status": session.widget.status.text(),
        "add_ms": [ms for ms, added in shows if added],
        "update_ms": [ms for ms, added in shows if not added],
    }


def _shows_current_view(layer: Any) -> bool:
    """Whether ``layer`` is loaded and, if multiscale, shows the tile of its current view: the
    loaded tile sits at the view's corner at the view's level (napari's ``loaded`` flag alone
    turns true early under async slicing while the tile is still being read)."""
    if not layer.loaded:
        return False
    if not layer.multiscale or not layer.visible:
        return True
    factor = np.asarray(layer.downsample_factors[layer.data_level][-2:], np.float64)
    tile = layer._transforms["tile2data"]
    corner = np.asarray(layer.corner_pixels[0][-2:], np.float64) * factor
    return bool(np.allclose(tile.scale[-2:], factor) and np.allclose(tile.translate[-2:], corner))


def _levels(viewer: Any) -> list[int | None]:
    """The pyramid level each layer shows (None: not multiscale)."""
    return [int(layer.data_level) if layer.multiscale else None for layer in viewer.layers]


def _session_child(
    out: str,
    store: str,
    mode: str,
    pans: int,
    view_bytes: float | None,
    widget_pans: int | None = None,
    in_memory_bytes: float | None = None,
    **kwargs: Any,
) -> None:
    # napari saves changed settings: to a file of this run, not the user's
    os.environ["NAPARI_CONFIG"] = str(Path(out).with_suffix(".napari.yaml"))
    if mode == "async":
        os.environ["NAPARI_ASYNC"] = "1"
    logging.basicConfig(level=logging.INFO)
    if view_bytes is not None:
        from hrdv2_dask.napari import _reader

        _reader.VIEW_BYTES = view_bytes
    if in_memory_bytes is not None:
        from hrdv2_dask.napari import _session

        _session.IN_MEMORY_BYTES = in_memory_bytes
    actions = default_actions(pans)
    if widget_pans is not None:
        actions += widget_actions(widget_pans)
    result = run_session(store, actions=actions, mode=mode, **kwargs)
    Path(out).write_text(json.dumps(result))


def _isolated_session(
    work: Path,
    store: Path,
    mode: str,
    pans: int,
    limit_s: float,
    view_bytes: float | None = None,
    widget_pans: int | None = None,
    in_memory_bytes: float | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`run_session` in a fresh process (a frozen GUI thread cannot time itself out)."""
    out = work / f"session_{mode}.json"
    out.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_session_child,
        args=(str(out), str(store), mode, pans, view_bytes, widget_pans, in_memory_bytes),
        kwargs=kw,
        daemon=True,
    )
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
        return {"mode": mode, "rows": [], "killed_after_s": limit_s}
    if not out.exists():
        return {"mode": mode, "rows": [], "failed": f"exit code {proc.exitcode}"}
    return json.loads(out.read_text())


# ------------------------------------------------------------------ suite


def _versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def run_napari(
    *,
    out_dir: str | os.PathLike,
    work: str | os.PathLike | None,
    source_px: int,
    out_stride: int,
    dim: int,
    chunk: int | None,
    pans: int,
    modes: Sequence[str],
    heartbeat_ms: int,
    limit_s: float,
    view_bytes: float | None = None,
    widget_pans: int | None = 2,
    in_memory_bytes: float | None = None,
) -> dict[str, Any]:
    """The suite's result: the synthetic store's recipe, one session per slicing mode (with
    :func:`widget_actions` after the default ones unless ``widget_pans`` is None)."""
    from hrdv2_dask.tiling import plan_tiles

    from .napari_store import write_gigapixel_store

    if not os.environ.get("DISPLAY"):
        raise SystemExit("the napari suite needs a display: run it as xvfb-run -a python -m ...")
    if chunk is None:  # a run's chunk grid: a window step in cells (~518 px windows)
        lcm = math.lcm(14, out_stride)
        tile = -(-518 // lcm) * lcm
        chunk = plan_tiles((source_px, source_px), out_stride=out_stride, tile_px=tile).chunk_cells
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="hrdv2-napari-bench-")
        work = tmp.name
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = work / f"gigapixel_{source_px}_s{out_stride}_d{dim}.zarr"
        t0 = time.perf_counter()
        recipe = write_gigapixel_store(
            store, source_px=source_px, out_stride=out_stride, dim=dim, chunk=chunk
        )
        recipe["write_s"] = round(time.perf_counter() - t0, 1)
        recipe["chunk_mean_ms"] = _chunk_mean_ms(store)
        recipe["whole_store_mean_s"] = round(recipe["chunk_mean_ms"] * recipe["chunks"] / 1e3)
        sessions = [
            _isolated_session(
                work,
                store,
                mode,
                pans,
                limit_s,
                view_bytes,
                widget_pans,
                in_memory_bytes,
                heartbeat_ms=heartbeat_ms,
            )
            for mode in modes
        ]
    finally:
        if tmp is not None:
            tmp.cleanup()
    env = environment("cpu")
    env["gui_versions"] = _versions()
    env["display"] = os.environ.get("DISPLAY")
    env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "environment": env,
        "store": recipe,
        "settings": {
            "heartbeat_ms": heartbeat_ms,
            "pans": pans,
            "limit_s": limit_s,
            "view_bytes": view_bytes,
            "widget_pans": widget_pans,
            "in_memory_bytes": in_memory_bytes,
        },
        "sessions": sessions,
    }


def _chunk_mean_ms(store: Path, n: int = 12) -> float:
    """Milliseconds to read one chunk and average its features (``n`` chunks, one thread):
    what the reader's feature mean costs per chunk."""
    from hrdv2_dask.io.store import open_features

    arr = open_features(store)
    c = arr.data.chunks[1][0]
    t0 = time.perf_counter()
    for k in range(n):
        block = arr.data[:, k * c : (k + 1) * c, :c].mean(axis=0)
        block.compute(scheduler="sync")
    return round((time.perf_counter() - t0) / n * 1e3, 1)


COLUMNS = [
    Column("action", "action"),
    Column("mode", "slicing"),
    Column("max_ms", "longest stall (ms)", "{:.0f}"),
    Column("p99_ms", "p99 gap (ms)", "{:.0f}"),
    Column("drawn_s", "drawn after (s)", "{:.2f}"),
    Column("call_ms", "call (ms)", "{:.0f}"),
    Column("shows", "layer add / update (ms)"),
    Column("levels", "levels shown"),
]


def to_markdown(result: dict[str, Any]) -> str:
    env, s, st = result["environment"], result["settings"], result["store"]
    rows = []
    notes = []
    for session in result["sessions"]:
        for row in session["rows"]:
            shows = " / ".join(
                ", ".join(f"{v:.0f}" for v in row.get(k) or []) or "–"
                for k in ("add_ms", "update_ms")
            )
            rows.append(
                {
                    **row,
                    "levels": ", ".join(str(v) for v in row.get("level") or []),
                    "shows": shows if "add_ms" in row else "",
                }
            )
            if row.get("widget_error"):
                notes.append(f"{session['mode']} {row['action']}: {row['widget_error']}")
        if session.get("killed_after_s"):
            notes.append(f"{session['mode']}: killed after {session['killed_after_s']:.0f} s.")
        if session.get("failed"):
            notes.append(f"{session['mode']}: failed ({session['failed']}).")
    gv = env["gui_versions"]
    gb = st["cells"] ** 2 * st["dim"] * 2 / 1e9
    canvas = next((x["canvas"] for x in result["sessions"] if x.get("canvas")), None)
    return "\n".join(
        [
            "### napari: responsiveness on a gigapixel feature store (CPU, Xvfb)",
            "",
            environment_line(env, speed_only=True)
            + f" napari {gv['napari']}, vispy {gv['vispy']}, PyQt6 {gv['PyQt6']} under Xvfb "
            "(Mesa software OpenGL).",
            "",
            f"Synthetic store of a {st['source_px']:,}² px source at out_stride "
            f"{st['out_stride']}: {st['cells']:,}² cells × {st['dim']} float16 features "
            f"({gb:,.0f} GB as a real store), chunks of {st['chunk']} cells; "
            f"{st['variants']} distinct chunks, the others hard links (page-cache reads). "
            f"Canvas {canvas[1] if canvas else '?'}×{canvas[0] if canvas else '?'} px, "
            f"heartbeat every {s['heartbeat_ms']} ms on the GUI thread. Reading and averaging "
            f"one chunk takes {st['chunk_mean_ms']:.0f} ms (one thread): the whole store, "
            f"{st['whole_store_mean_s']:,} s."
            + (
                f" Reader's VIEW_BYTES: {s['view_bytes']:g}."
                if s.get("view_bytes") is not None
                else ""
            ),
            "",
            markdown_table(rows, COLUMNS),
            *(["", *notes] if notes else []),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source-px", type=int, default=100_000, help="(default: %(default)s)")
    parser.add_argument("--out-stride", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--dim", type=int, default=384, help="features (default: %(default)s)")
    parser.add_argument("--chunk", type=int, help="chunk side in cells (default: a run's)")
    parser.add_argument("--pans", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument(
        "--modes", default="sync,async", help="napari slicing modes (default: %(default)s)"
    )
    parser.add_argument("--heartbeat-ms", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument(
        "--limit-s", type=float, default=900.0, help="per session (default: %(default)s)"
    )
    parser.add_argument("--work", help="folder of the synthetic store (default: a temporary one)")
    parser.add_argument(
        "--view-bytes",
        type=float,
        help="the reader's VIEW_BYTES (inf: no placeholder levels, as before; default: its own)",
    )
    parser.add_argument(
        "--widget-pans",
        type=int,
        default=2,
        help="pans over the lazy similarity in the widget actions (-1: no widget actions; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--in-memory-bytes",
        type=float,
        help="the widget's IN_MEMORY_BYTES (default: its own; --quick: 1e6, lazy results)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="8000² px, 16 features, two pans, lazy results"
    )


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    quick = args.quick
    return run_napari(
        out_dir=args.out,
        work=args.work,
        source_px=8000 if quick else args.source_px,
        out_stride=args.out_stride,
        dim=16 if quick else args.dim,
        chunk=args.chunk,
        pans=2 if quick else args.pans,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        heartbeat_ms=args.heartbeat_ms,
        limit_s=180.0 if quick else args.limit_s,
        view_bytes=args.view_bytes,
        widget_pans=None if args.widget_pans < 0 else args.widget_pans,
        in_memory_bytes=1e6 if quick and args.in_memory_bytes is None else args.in_memory_bytes,
    )
