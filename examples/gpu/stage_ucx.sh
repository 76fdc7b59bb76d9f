#!/bin/bash
# Stage ucxx (UCX for Python, cu13 wheels for cp312) for the lent GPU machines, which have no
# internet: the wheels are about 67 MB, more than one device call carries beside the project, so
# they go in two git-ignored parts, .gpu/d (libucx, 43 MB) and .gpu/e (the rest, 26 MB).
# After ../shared/gpu/stage.sh and its three calls, two more calls carrying .gpu/d, then .gpu/e:
#     mkdir -p /tmp/stage/ucx && cp .gpu/X/*.whl /tmp/stage/ucx/
# and, in the second, install them beside vLLM:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/ucx/*.whl
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
