#!/usr/bin/env bash
# Installs pdrun with vLLM for CPU, then deploys 1 prefiller + 2 decoders on the embedded tiny model,
# sharing a KV cache tier in memory (add --cache-dir DIR to keep it across restarts),
# behind one OpenAI endpoint, http://127.0.0.1:8000/v1 (about 2 minutes to healthy on 2 cores).
# Talk to it with examples/client.py; Ctrl-C stops everything. Extra arguments go to pdrun launch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[cpu]"
python -m pip uninstall -q -y torchvision torchaudio torchcodec
exec pdrun launch --prefill 1 --decode 2 "$@"
