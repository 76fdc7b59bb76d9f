#!/bin/bash
# ucxx (UCX for Python: pdrun's ucx transport) for a CUDA host without internet access. Run it on a
# machine with internet: it downloads ucxx-cu13 and its dependencies as wheels for CPython 3.12 on
# manylinux x86-64 (about 67 MB) into two folders, DEST/d (libucx, 43 MB) and DEST/e (the rest,
# 26 MB), so that each fits a copy with a size limit, and keeps DEST out of git. Copy both folders
# to the CUDA host and install the wheels there, beside vLLM:
#     python3 -m pip install --no-index --no-deps DEST/d/*.whl DEST/e/*.whl
# (add --target DIR, and put DIR on PYTHONPATH, to install into a folder of your own; give it to
# examples/gpu/measure.sh as SITE=DIR). For another Python version or
# platform, change --python-version and the --platform list below.
# Usage (from the project root): bash examples/gpu/stage_ucx.sh [DEST=.gpu]
set -euo pipefail
DEST=${1:-.gpu}
PLAT=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLAT+=(--platform "$p")
done
W=$(mktemp -d)
python3 -m pip download -q "${PLAT[@]}" -d "$W" ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.22.0 \
  rmm-cu13==26.10.0 librmm-cu13==26.10.0 rapids-logger==0.3.0 cuda-core==1.2.2 cuda-pathfinder==1.9.0 \
  cuda-bindings==13.5.0 nvidia-ml-py==13.615.71
rm -rf "$DEST/d" "$DEST/e" && mkdir -p "$DEST/d" "$DEST/e"
mv "$W"/libucx_cu13-*.whl "$DEST/d/" && mv "$W"/*.whl "$DEST/e/"
mkdir -p .git/info && (grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude)
rm -rf "$W"
du -sh "$DEST/d" "$DEST/e"
