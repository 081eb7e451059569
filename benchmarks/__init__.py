"""Benchmark suite of hrdv2-dask: ``python -m benchmarks SUITE [options] --out DIR``.

Suites (one module each):

``core``
    ``highres_features`` against the backbone alone and the naive recipe, in memory
    (time, ratio, MP/s, peak host and device memory).
``e2e``
    End-to-end ``extract`` of a synthetic chunked Zarr image (wall time, MP/s, peak RSS),
    1 vs 2 CPU workers.
``seams``
    Tiled vs whole-image features on a homogeneous micrograph: seam ratio, relative L2 error and
    the periodic-artefact power at the window stride, with and without ``debias``.
``mask``
    Background skipping: ``extract`` on a slide-like image that is 60 % glass, without and with
    ``mask="auto"`` (wall time, windows computed, speed-up, foreground identical).
``collection``
    Many small images in one ``extract_collection`` run against one image of as many windows
    (throughput ratio) and against a shell loop of ``hrdv2 features`` (speed-up).
``profile``
    Where an end-to-end run spends its time inside the worker processes (Dask's statistical
    profiler): share of samples per function.
``fidelity``
    bf16 autocast against fp32: relative error of patch tokens and HR features (official-format
    checkpoint) at 518² and 224 × 280.
``quality``
    k-means on the features of a texture mosaic with a known layout: mIoU (Hungarian
    matching) and boundary F-score, for low-res bilinear, stride trick, HR-Dv2 and both.
``retrieval``
    ``build_index`` and ``search``: regions per second to index a store, and FAISS query
    latency, size and IVF-PQ recall at 10^5 and 10^6 vectors (flat and IVF-PQ).
``napari``
    The napari viewer on a synthetic feature store of a 100k × 100k px source: the GUI
    thread's longest stall and time to draw for open, full view, zoom and pans (needs a
    display: ``xvfb-run -a``).

Each writes ``DIR/SUITE.json`` (results and an ``environment`` block) and ``DIR/SUITE.md`` (a
Markdown section for ``benchmarks/RESULTS.md``). Metrics are pure functions in
:mod:`benchmarks.metrics`; shared helpers in :mod:`benchmarks.common`.
"""

SUITES = (
    "core",
    "e2e",
    "seams",
    "mask",
    "collection",
    "quality",
    "profile",
    "fidelity",
    "retrieval",
    "napari",
)
