#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that a lent GPU machine lacks to run the
# benchmarks from a copy of this repository. Its image already has torch, timm, numpy, xarray,
# scikit-image, tifffile, safetensors, psutil, tqdm and pyyaml; dask, distributed and zarr (and
# their own dependencies below) it has not. Python 3.12, x86-64, wheels only.
#
# There, from the repository root (.whl carried along):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 -m benchmarks core --device cuda --out "$OUT/core"
set -euo pipefail
cd "$(dirname "$0")/.."

# The versions of the CPU results in benchmarks/RESULTS.md.
wheels=(
    dask==2026.8.0
    distributed==2026.8.0
    zarr==3.1.6
    numcodecs==0.16.6
    donfig==0.8.1.post1
    google-crc32c==1.9.0
    partd==1.4.2
    locket==1.0.0
    tblib==3.2.2
    zict==3.0.0
    tornado==6.6.1
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"
ls .whl
