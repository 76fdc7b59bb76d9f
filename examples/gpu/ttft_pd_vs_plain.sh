#!/bin/bash
# TTFT of a long prompt: 1P1D through pdrun against one cold vLLM, measured the same way (streamed,
# through `pdrun proxy`, by `pdrun profile requests`), every prompt new so nothing is cached.
#   CUDA host (MODEL_DIR: a model's config.json and tokenizer; served with dummy weights):
#     bash examples/gpu/ttft_pd_vs_plain.sh MODEL_DIR 16384 ucx OUT_DIR
#   CPU (the flow, with the tiny model):  bash examples/gpu/ttft_pd_vs_plain.sh tiny 1000 tcp /tmp/ttft
# With two GPUs, 1P1D is `pdrun launch` on GPUs 0 and 1; with one (or GPUS=0), the prefiller and the
# decoder share GPU 0 (0.4 of its memory each), started one after the other behind `pdrun proxy`.
# A streamed answer's first token is the prefiller's, sent as soon as the prefill answers. Writes
# plain.json, pd.json, pd_nostream.json and ttft.json (medians and ratios) into OUT_DIR.
# LAYERWISE=1: both hand off layer by layer (the connector's `layerwise`: the decoder loads inside
# its forward pass).
set -euo pipefail
MODEL=${1:?model dir (or tiny)}; TOKENS=${2:-16384}; TRANSPORT=${3:-ucx}; OUT_DIR=${4:-ttft}
N=${N:-6}; MAXLEN=$((TOKENS + 512)); LAYERWISE=${LAYERWISE:-0}
mkdir -p "$OUT_DIR"; OUT_DIR=$(cd "$OUT_DIR" && pwd)
LW=$([ "$LAYERWISE" = 1 ] && echo true || echo false)
PDARGS=(); [ "$LAYERWISE" = 1 ] && PDARGS=(--no-async-scheduling)  # a decoder's loads in its forward pass need it
printf 'connector:\n  layerwise: %s\n' "$LW" > "$OUT_DIR/launch.yaml"
if [ "$MODEL" = tiny ]; then MODEL=$(python3 -m pdrun.launch model tiny); DEV=cpu; GPUS=(); VARGS=(); export VLLM_CPU_KVCACHE_SPACE=2
else DEV=cuda; VARGS=(--load-format dummy --enforce-eager)
  NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
  if [ "${GPUS:-}" = 0 ] || [ "$NGPU" -lt 2 ]; then SHARED=1; VARGS+=(--gpu-memory-utilization 0.4)
  else GPUS=(--gpus 0,1); VARGS+=(--gpu-memory-utilization 0.85); fi; fi
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done; sleep 5
            for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_up() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; echo "not up: $1"; exit 1; }

# 1. One vLLM alone, cold: the baseline (its proxy sends every request decode-only).
if [ "$DEV" = cuda ]; then export CUDA_VISIBLE_DEVICES=0; fi
python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name m --port 8190 \
  --max-model-len "$MAXLEN" "${VARGS[@]}" > "$OUT_DIR/plain-vllm.log" 2>&1 &
PIDS+=($!); wait_up localhost:8190/health
python3 -m pdrun.launch proxy --decode http://127.0.0.1:8190 --port 8191 > "$OUT_DIR/plain-proxy.log" 2>&1 &
PIDS+=($!); wait_up localhost:8191/health
python3 -m pdrun.launch profile requests --url http://127.0.0.1:8191 -n "$N" --prompt-tokens "$TOKENS" --max-tokens 8 \
  --json "$OUT_DIR/plain.json"
cleanup; PIDS=(); unset CUDA_VISIBLE_DEVICES

# 2. 1P1D, no cache tier (nothing to reuse here).
if [ "${SHARED:-0}" = 1 ]; then  # one GPU: each instance sizes its KV cache after the other is up
  export CUDA_VISIBLE_DEVICES=0
  for role in kv_producer:8193:8300 kv_consumer:8194:8310; do IFS=: read -r R PORT KV <<< "$role"
    KTC=$(python3 -c "import json,sys; from pdrun.launch.vllm_server import kv_transfer_config as k
print(json.dumps(k(sys.argv[1], int(sys.argv[2]), {'transport': sys.argv[3], 'layerwise': sys.argv[4] == 'true'})))" \
      "$R" "$KV" "$TRANSPORT" "$LW")
    python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name m --port "$PORT" \
      --max-model-len "$MAXLEN" --kv-transfer-config "$KTC" "${VARGS[@]}" "${PDARGS[@]}" > "$OUT_DIR/pd-$R.log" 2>&1 &
    PIDS+=($!); wait_up "localhost:$PORT/health"; done
  python3 -m pdrun.launch proxy --prefill http://127.0.0.1:8193 --decode http://127.0.0.1:8194 --port 8192 \
    > "$OUT_DIR/pd-proxy.log" 2>&1 &
else
  python3 -m pdrun.launch launch --model "$MODEL" --served-model-name m --prefill 1 --decode 1 --device "$DEV" \
    "${GPUS[@]}" --transport "$TRANSPORT" --port 8192 --max-model-len "$MAXLEN" --cache-cpu-gb 0 \
    --run-dir "$OUT_DIR/run" --config "$OUT_DIR/launch.yaml" -- "${VARGS[@]}" "${PDARGS[@]}" > "$OUT_DIR/pd-launch.log" 2>&1 &
fi
PIDS+=($!); wait_up localhost:8192/health
python3 -m pdrun.launch profile requests --url http://127.0.0.1:8192 -n "$N" --prompt-tokens "$TOKENS" --max-tokens 8 \
  --json "$OUT_DIR/pd.json"
# Non-streamed answers carry the decoder's own hand-off time (load_s): where the rest goes.
python3 -m pdrun.launch profile requests --url http://127.0.0.1:8192 -n 3 --prompt-tokens "$TOKENS" --max-tokens 8 \
  --no-stream --json "$OUT_DIR/pd_nostream.json"

python3 - "$OUT_DIR" "$LAYERWISE" <<'PY'
import json, statistics, sys
d = sys.argv[1]
runs = {k: json.load(open(f"{d}/{k}.json")) for k in ("plain", "pd")}
# The first request of each warms the engine (allocations, kernels): medians of the rest.
med = lambda k, p: statistics.median(r[p] for r in runs[k]["requests"][1:])  # noqa: E731
ttft = {k: med(k, "ttft") for k in runs}
nostream = json.load(open(f"{d}/pd_nostream.json"))["requests"][1:]
phases = {p: med("pd", p) for p in ("queue", "prefill", "first_token")}
phases["handoff"] = statistics.median(r["handoff"] for r in nostream) if nostream else None
out = {"tokens": runs["pd"]["requests"][0]["prompt_tokens"], "layerwise": sys.argv[2] == "1", "ttft_s": ttft,
       "ratio": {"pd": ttft["pd"] / ttft["plain"]},
       "tpot_s": {k: med(k, "tpot") for k in runs}, "total_s": {k: med(k, "total") for k in runs},
       "pd_phases_s": phases, "modes": {k: sorted({r["mode"] for r in runs[k]["requests"]}) for k in runs}}
json.dump(out, open(f"{d}/ttft.json", "w"), indent=1)
print(json.dumps(out))
PY
