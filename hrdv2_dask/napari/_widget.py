"""The dock widget: similarity from clicked points, scribble segmentation, PCA, clusters, saved
models and export, on a feature store opened by the reader.

Every button runs its work in a napari thread worker (:func:`napari.qt.threading.create_worker`),
never on the GUI thread: the fit and the cells in view first (a layer appears at the displayed
resolution), then the whole grid, each handed to the GUI thread by the worker's ``yielded``
signal, which updates the layer. An error becomes one napari notification line. The logic is
in :mod:`._session`; this module only reads the viewer and draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..analysis import KMeansOptions, SegmentOptions
from ..errors import InputError
from ._session import KINDS, Grid, Result, Session, one_line, with_progress

if TYPE_CHECKING:
    import napari

__all__ = ["Hrdv2Widget"]

_PLUGIN = "hrdv2-dask"
#: A new result layer is made hidden and shown this much later: the event loop runs between
#: its making and its first draw (two shorter stalls, not one).
_SHOW_AFTER_MS = 15


#: Shown when a big store opens under napari's default slicing (benchmarks/RESULTS.md, napari).
_SYNC_HINT = (
    "Big store: napari reads each new screen on its GUI thread (~1-2 s a screen); start napari "
    "with NAPARI_ASYNC=1 (or Preferences > Experimental) to read in the background."
)


def _async_slicing() -> bool:
    """Whether napari slices layers in a worker thread (its experimental async setting)."""
    from napari.settings import get_settings

    return bool(getattr(get_settings().experimental, "async_", False))


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


class Hrdv2Widget(QWidget):
    """The ``hrdv2-dask`` dock widget (napari: Plugins > HR-Dv2 analysis)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._sessions: dict[tuple, Session] = {}
        self._workers: list[Any] = []
        self._buttons: list[QPushButton] = []
        self.last_error: str | None = None
        self._watched: Any = None  # the points layer whose clicks update the similarity
        self._pending = False

        layout = QVBoxLayout(self)
        layout.addWidget(self._store_box())
        layout.addWidget(self._similarity_box())
        layout.addWidget(self._segment_box())
        layout.addWidget(self._explore_box())
        layout.addWidget(self._model_box())
        self.status = QLabel("Open a feature store, or drop one on napari.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)

        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # --- building ---------------------------------------------------------------------

    def _button(self, text: str, slot: Callable[[], None], tip: str = "") -> QPushButton:
        button = QPushButton(text)
        button.clicked.connect(slot)
        button.setToolTip(tip)
        self._buttons.append(button)
        return button

    def _store_box(self) -> QGroupBox:
        box = QGroupBox("Feature store")
        form = QFormLayout(box)
        self.store_layer = QComboBox()
        self.store_layer.setToolTip("a features layer opened by the hrdv2-dask reader")
        form.addRow("layer", self.store_layer)
        self.store_path = QLineEdit()
        self.store_path.setPlaceholderText("features.zarr, or collection.zarr/KEY")
        row = QHBoxLayout()
        row.addWidget(self.store_path)
        browse = QPushButton("…")
        browse.clicked.connect(lambda: self._browse(self.store_path))
        row.addWidget(browse)
        row.addWidget(self._button("Open", self.open_store, "open the store with the reader"))
        form.addRow("path", row)
        return box

    def _similarity_box(self) -> QGroupBox:
        box = QGroupBox("Similarity")
        form = QFormLayout(box)
        self.points_layer = QComboBox()
        self.points_layer.currentTextChanged.connect(self._watch_points)
        form.addRow("points", self.points_layer)
        self.live = QCheckBox("update on each click")
        self.live.setChecked(True)
        form.addRow(self.live)
        row = QHBoxLayout()
        row.addWidget(self._button("New points", self.new_points, "a Points layer to click in"))
        row.addWidget(
            self._button("Similarity", self.run_similarity, "cosine similarity to the points")
        )
        form.addRow(row)
        return box

    def _segment_box(self) -> QGroupBox:
        box = QGroupBox("Scribble segmentation")
        form = QFormLayout(box)
        self.labels_layer = QComboBox()
        form.addRow("scribbles", self.labels_layer)
        self.method = QComboBox()
        self.method.addItems(list(SegmentOptions.specs()["method"].choices or ()))
        self.method.setCurrentText(SegmentOptions.method)
        form.addRow("method", self.method)
        row = QHBoxLayout()
        row.addWidget(
            self._button("New scribbles", self.new_scribbles, "a Labels layer to paint 1, 2, ...")
        )
        row.addWidget(
            self._button("Train + segment", self.run_segment, "train on the scribbles, predict")
        )
        form.addRow(row)
        return box

    def _explore_box(self) -> QGroupBox:
        box = QGroupBox("Explore")
        row = QHBoxLayout(box)
        row.addWidget(self._button("PCA", self.run_pca, "first 3 components as RGB"))
        spec = KMeansOptions.specs()["k"]
        self.k = QSpinBox()
        self.k.setRange(int(spec.minimum or 2), min(int(spec.maximum or 64), 2**31 - 1))
        self.k.setValue(KMeansOptions.k)
        self.k.setPrefix("k = ")
        row.addWidget(self.k)
        row.addWidget(self._button("Clusters", self.run_clusters, "k-means of the features"))
        return box

    def _model_box(self) -> QGroupBox:
        box = QGroupBox("Model and export")
        form = QFormLayout(box)
        self.result_kind = QComboBox()
        self.result_kind.addItems(list(KINDS))
        self.result_kind.setCurrentText("segmentation")
        form.addRow("result", self.result_kind)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("model folder (hrdv2 apply reads it)")
        form.addRow("model", self.model_path)
        row = QHBoxLayout()
        row.addWidget(self._button("Save model", self.save_model, "--save-model files"))
        row.addWidget(self._button("Apply model", self.apply_model, "a saved model on this store"))
        form.addRow(row)
        self.export_path = QLineEdit()
        self.export_path.setPlaceholderText("output folder")
        form.addRow("export to", self.export_path)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        row = QHBoxLayout()
        row.addWidget(self._button("Export", self.export, "full resolution, the CLI's files"))
        row.addWidget(self.progress)
        form.addRow(row)
        return box

    def _browse(self, field: QLineEdit) -> None:
        path = QFileDialog.getExistingDirectory(self, "Feature store", field.text())
        if path:
            field.setText(path)

    # --- layers -----------------------------------------------------------------------

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Labels, Points

        for combo, keep in (
            (self.store_layer, lambda ly: ly.metadata.get("hrdv2_kind") == "features"),
            (self.points_layer, lambda ly: isinstance(ly, Points)),
            (
                self.labels_layer,
                lambda ly: isinstance(ly, Labels) and not ly.metadata.get("hrdv2_kind"),
            ),
        ):
            current = combo.currentText()
            names = [ly.name for ly in self.viewer.layers if keep(ly)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif names:
                combo.setCurrentIndex(len(names) - 1)  # the newest
            combo.blockSignals(False)
        name = self.points_layer.currentText()
        if (
            self._watched is None
            or self._watched.name != name
            or self._watched not in (self.viewer.layers)
        ):
            self._watch_points(name)

    def _watch_points(self, name: str) -> None:
        if self._watched is not None:
            self._watched.events.data.disconnect(self._on_points)
            self._watched = None
        self._watched = self.viewer.layers[name] if name in self.viewer.layers else None
        if self._watched is not None:
            self._watched.events.data.connect(self._on_points)

    def _on_points(self, event: Any = None) -> None:
        """Points added, moved or deleted: the similarity again (once the running step ends)."""
        if getattr(event, "action", None) in ("adding", "removing", "changing"):
            return  # the data change itself follows
        if not self.live.isChecked() or self._watched is None or not len(self._watched.data):
            return
        if not self.store_layer.currentText():
            return
        if self.busy:
            self._pending = True
            return
        self.run_similarity()

    def _layer(self, combo: QComboBox, what: str) -> Any:
        name = combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError(what)
        return self.viewer.layers[name]

    def session(self) -> Session:
        """The session of the chosen features layer (placed as that layer is)."""
        layer = self._layer(
            self.store_layer, "No features layer; open a feature store (path, then Open)."
        )
        grid = Grid(
            tuple(int(s) for s in np.shape(layer.data[0] if layer.multiscale else layer.data)[-2:]),
            tuple(float(v) for v in layer.scale[-2:]),
            tuple(float(v) for v in layer.translate[-2:]),
        )
        key = (layer.metadata["path"], grid)
        if key not in self._sessions:
            self._sessions[key] = Session(layer.metadata["path"], grid)
            _freeze_heap()
        return self._sessions[key]

    def _camera(self) -> Any:
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        return scene.camera if scene is not None else self.viewer.camera

    def _canvas_size(self) -> tuple[int, int]:
        canvas = getattr(self.viewer, "canvas", None)  # napari >= 0.6
        size = canvas.size if canvas is not None else getattr(self.viewer, "_canvas_size", None)
        return tuple(int(v) for v in size) if size is not None else (600, 800)

    def _view_window(self, session: Session) -> tuple[slice, slice] | None:
        camera, (h, w) = self._camera(), self._canvas_size()
        centre = np.asarray(camera.center[-2:], dtype=np.float64)
        half = np.asarray([h, w], dtype=np.float64) / (2 * camera.zoom)
        return session.grid.window(centre - half, centre + half, (h, w))

    # --- buttons ----------------------------------------------------------------------

    def open_store(self) -> None:
        """Open the path with the reader (its layers appear; the features layer is chosen)."""
        path = self.store_path.text().strip()
        if not path:
            self._error("Type the path of a feature store (or collection.zarr/KEY) first.")
            return
        try:
            layers = self.viewer.open(path, plugin=_PLUGIN)
        except Exception as err:  # noqa: BLE001 - the reader's error, in one line
            self._error(one_line(err.__cause__ or err))
            return
        feats = [ly for ly in layers if ly.metadata.get("hrdv2_kind") == "features"]
        if feats:
            self.store_layer.setCurrentText(feats[0].name)
            if feats[0].multiscale and not _async_slicing():
                self.status.setText(_SYNC_HINT)

    def new_points(self) -> None:
        """A Points layer in add mode, for query points."""
        layer = self.viewer.add_points(
            ndim=2, name="query points", size=self._marker(), face_color="cyan"
        )
        layer.mode = "add"
        self.points_layer.setCurrentText(layer.name)

    def new_scribbles(self) -> None:
        """An empty Labels layer on the features' pixel lattice, in paint mode."""
        try:
            session = self.session()
            shape, scale, translate = session.scribbles_layer(self._view_window(session))
        except Exception as err:  # noqa: BLE001
            self._error(one_line(err))
            return
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint8), name="scribbles", scale=scale, translate=translate
        )
        layer.mode = "paint"
        layer.brush_size = max(3, round(self._marker() / scale[0]))
        layer.selected_label = 1
        self.labels_layer.setCurrentText(layer.name)

    def _marker(self) -> float:
        """A marker size of about 10 screen pixels, in world units."""
        return float(10 / max(self._camera().zoom, 1e-9))

    def run_similarity(self) -> None:
        try:
            layer = self._layer(self.points_layer, "No Points layer; press New points, click.")
            world = np.array([layer.data_to_world(p) for p in layer.data]).reshape(-1, 2)
        except Exception as err:  # noqa: BLE001
            self._error(one_line(err))
            return
        self._analyse(lambda s: s.similarity(world))

    def run_segment(self) -> None:
        try:
            layer = self._layer(
                self.labels_layer, "No scribbles layer; press New scribbles and paint 1 and 2."
            )
            labels = layer.data
            scale, translate = tuple(layer.scale[-2:]), tuple(layer.translate[-2:])
        except Exception as err:  # noqa: BLE001
            self._error(one_line(err))
            return
        method = self.method.currentText()

        # not copied here (a scribbles layer on 25,000² cells is 625 MB: a 1.1 s freeze of the
        # GUI thread): the worker crops the labelled part (Grid.scribbles copies it); strokes
        # painted meanwhile may or may not count
        self._analyse(lambda s: s.segment(labels, scale, translate, method=method))

    def run_pca(self) -> None:
        self._analyse(lambda s: s.pca())

    def run_clusters(self) -> None:
        k = int(self.k.value())
        self._analyse(lambda s: s.clusters(k))

    def apply_model(self) -> None:
        path = self.model_path.text().strip()
        if not path:
            self._error("Type the folder of a saved model first (pca, cluster or segment).")
            return
        self._analyse(lambda s: s.apply(path))

    def save_model(self) -> None:
        path, kind = self.model_path.text().strip(), self.result_kind.currentText()
        if not path:
            self._error("Type a folder to save the model to first.")
            return

        def work(session: Session) -> Iterator[Any]:
            yield "status", f"model saved to {session.save_model(kind, path)}"

        self._start(work)

    def export(self) -> None:
        out, kind = self.export_path.text().strip(), self.result_kind.currentText()
        if not out:
            self._error("Type an output folder to export to first.")
            return
        self.progress.setValue(0)

        def work(session: Session) -> Iterator[Any]:
            session.result(kind)  # nothing to export: say so before starting
            for step in with_progress(lambda: session.export(kind, out)):
                if step[0] == "done":
                    yield "status", f"exported {kind} to {out}"
                else:
                    yield "progress", step

        self._start(work)

    # --- running work off the GUI thread ----------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a worker is running."""
        return bool(self._workers)

    def _analyse(self, make: Callable[[Session], Result]) -> None:
        """Fit and show a result: the cells in view first, then all of them."""
        try:
            window = self._view_window(self.session())
        except Exception as err:  # noqa: BLE001
            self._error(one_line(err))
            return

        def work(session: Session) -> Iterator[Any]:
            result = make(session)
            lazy = session.lazy(result)
            # lazy levels cost nothing yet; a full-resolution view fills their kept chunks
            full = session.full(result) if lazy else None
            whole = (slice(0, session.grid.shape[0], 1), slice(0, session.grid.shape[1], 1))
            if window is not None and (lazy or window != whole):
                # at full resolution a lazy result's view only fills the kept chunks (the
                # lazy layer shows the same cells): no second layer to make
                role = ("fill" if window[0].step == 1 else "view") if lazy else ""
                yield "layer", session, result, *session.view(result, window), role
            yield "layer", session, result, *(full or session.full(result)), ""
            yield "status", _describe(result)

        self._start(work)

    def _start(self, work: Callable[[Session], Iterator[Any]]) -> None:
        from napari.qt.threading import create_worker

        if self.busy:
            self._error("Busy: wait for the running step to finish.")
            return
        try:
            session = self.session()
        except Exception as err:  # noqa: BLE001
            self._error(one_line(err))
            return
        self.last_error = None
        worker = create_worker(work, session, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(lambda err: self._error(one_line(err)))
        worker.finished.connect(lambda: self._finished(worker))
        self._workers.append(worker)
        for button in self._buttons:
            button.setEnabled(False)
        self.status.setText("working…")
        worker.start()

    def _finished(self, worker: Any) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._workers:
            for button in self._buttons:
                button.setEnabled(True)
            if self._pending:
                self._pending = False
                self.run_similarity()

    def _on_yielded(self, item: tuple) -> None:
        what = item[0]
        if what == "status":
            self.status.setText(item[1])  # a line in the widget, no notification
        elif what == "progress":
            done, total = item[1]
            self.progress.setValue(int(1000 * done / max(total, 1)))
        elif what == "layer":
            self._show(*item[1:])

    def _error(self, message: str) -> None:
        self.last_error = message
        self.status.setText(message)
        _notify_error(message)

    def _show(self, session: Session, result: Result, data: Any, place: dict, role: str) -> None:
        """Add or update the result's layer, in place where it exists: making a napari layer
        is what stalls the GUI thread (100-200 ms here: its controls, its vispy visual, its
        first draw), not a data update.

        ``role`` "": the in-memory result (a view or the whole grid) or the lazy levels of a
        big grid, to the layer ``STORE: KIND``. "view": a zoomed-out view of a lazily shown
        result, to ``STORE: KIND (view)`` under it (it shows through the lazy layer's
        placeholder levels). "fill": a full-resolution view of one, which only updates that
        layer if there is one. For both, the lazy layer, stale until its new levels come, is
        hidden. A new layer is made hidden and shown :data:`_SHOW_AFTER_MS` later, so that its
        making and its first draw are two shorter stalls.
        """
        name = f"{session.name}: {result.kind}"
        meta = {"hrdv2_kind": result.kind, "path": str(session.path)}
        multiscale = isinstance(data, list)
        if role:
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = False
            name = f"{name} (view)"
        old = self.viewer.layers[name] if name in self.viewer.layers else None
        if old is not None and bool(old.multiscale) == multiscale and _same_kind(old, data):
            old.data = data
            old.scale, old.translate = place["scale"], place["translate"]
            old.metadata.update(meta)
            if result.kind == "similarity":
                old.contrast_limits = (0.0, 1.0)
            old.visible = True
            return
        if role == "fill":
            return
        kwargs: dict[str, Any] = {"name": name, "metadata": meta, "multiscale": multiscale}
        kwargs.update(place, visible=False)
        if old is not None:
            kwargs["opacity"] = old.opacity
            self.viewer.layers.remove(old)
        if result.labels:
            layer = self.viewer.add_labels(data, opacity=kwargs.pop("opacity", 0.6), **kwargs)
        elif result.kind == "pca":
            layer = self.viewer.add_image(
                data, rgb=True, opacity=kwargs.pop("opacity", 0.7), **kwargs
            )
        else:
            layer = self.viewer.add_image(
                data,
                colormap="inferno",
                contrast_limits=(0.0, 1.0),
                opacity=kwargs.pop("opacity", 0.7),
                **kwargs,
            )
        if role:  # the view under the lazy layer
            main = name.removesuffix(" (view)")
            if main in self.viewer.layers:
                at, here = self.viewer.layers.index(main), self.viewer.layers.index(layer)
                if here > at:
                    self.viewer.layers.move(here, at)
        from qtpy.QtCore import QTimer

        QTimer.singleShot(_SHOW_AFTER_MS, lambda: setattr(layer, "visible", True))


def _freeze_heap() -> None:
    """Move every object alive now (napari's, Qt's, the store's) out of the garbage
    collector's reach, once a store is opened: Python's full collections (they hold the
    GIL) then skip them. Not after each layer: a replaced layer's cycles, not collected yet,
    would never be."""
    import gc

    gc.freeze()


def _same_kind(layer: Any, data: Any) -> bool:
    """Whether ``data`` can replace ``layer``'s in place (same number of channels)."""
    first = data[0] if isinstance(data, list) else data
    old = layer.data[0] if layer.multiscale else layer.data
    return len(first.shape) == len(old.shape) and first.shape[2:] == old.shape[2:]


def _describe(result: Result) -> str:
    """One status line about a finished result."""
    info = result.info
    if result.kind == "segmentation" and "train_accuracy" in info:
        hold = info.get("holdout_accuracy")
        extra = f", holdout {hold:.3f}" if hold is not None else ""
        return (
            f"segmentation: classes {info.get('classes')}, trained on {info.get('n_train')} "
            f"cells, accuracy {info['train_accuracy']:.3f}{extra}"
        )
    if result.kind == "similarity":
        return f"similarity to the mean of {len(info['points'])} cell(s)"
    if "model" in info:
        return f"{result.kind}: applied {Path(info['model']).name}"
    return f"{result.kind} done"
