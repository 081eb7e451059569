"""napari plugin (the ``napari`` extra), declared in ``hrdv2_dask/napari.yaml``: a reader for
feature stores, collections and analysis outputs (:mod:`._reader`), and a dock widget for
similarity, scribble segmentation, PCA, clusters, saved models and export (:mod:`._widget`,
its logic in :mod:`._session`).

Only ``_widget`` imports Qt and napari (napari loads it when the widget is opened): the reader
returns plain napari layer-data tuples and the session is plain Python, so both are tested
without a viewer.
"""

from ._reader import napari_get_reader, napari_get_stack_reader, read_path, read_stack

__all__ = ["napari_get_reader", "napari_get_stack_reader", "read_path", "read_stack"]
