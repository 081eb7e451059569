"""napari plugin (the ``napari`` extra): a reader for feature stores, collections and analysis
outputs, declared in ``hrdv2_dask/napari.yaml``.

Nothing here imports napari: the reader returns plain napari layer-data tuples, so it is
tested without a viewer.
"""

from ._reader import napari_get_reader, napari_get_stack_reader, read_path, read_stack

__all__ = ["napari_get_reader", "napari_get_stack_reader", "read_path", "read_stack"]
