#!/bin/bash
# pdrun's GPU measurements (docs/benchmarks.md), one step at a time, each short enough to run alone.
# Needs a CUDA host with pdrun, vLLM and ucxx importable (pip install -e '.[gpu,ucx,test]'; on a
# host without internet, see the README and examples/gpu/stage_ucx.sh; wheels installed with
# pip --target DIR are found with SITE=DIR, and this checkout then through source_path.sh).
# Results go to OUT.
#   bash examples/gpu/measure.sh transfer OUT   # bench_handoff_gpu (chunks_in_flight 1, 4, 8; 1024-token
#                                               # chunks) + pdrun profile transfer
#   bash examples/gpu/measure.sh pd-ucx OUT     # 1P1D == one vLLM, 8B shape, over ucx (pytest -m gpu)
#   bash examples/gpu/measure.sh pd-tcp OUT     # the same over tcp
#   bash examples/gpu/measure.sh ttft OUT       # TTFT of 1P1D vs one cold vLLM at 16k tokens, over ucx
#   bash examples/gpu/measure.sh layers OUT     # the layer-by-layer hand-off (`layerwise`): the bench,
#                                               # whole chunks then by layer
#   bash examples/gpu/measure.sh layers-ttft OUT  # TTFT as `ttft`, default then both servers layerwise
#   bash examples/gpu/measure.sh decode OUT     # a 1P1D decoder's TPOT against one plain vLLM decoding the
#                                               # same batch (pdrun bench decode, two GPUs, CUDA graphs)
#   bash examples/gpu/measure.sh diagnose OUT   # where the GPU hand-off's time goes: the decoder under
#                                               # cProfile, wire only (no scatter), bigger chunks, torch
#                                               # copies; host-staged paths and the UCX protocols they take
# The model steps (pd-*, ttft, layers-ttft) serve MODEL8B: a directory with a Llama-3.1-8B
# config.json and tokenizer (no weights needed: dummy weights are used).
set -uo pipefail
STEP=${1:?step}; OUT=${2:?out dir}; mkdir -p "$OUT"
export PYTHONPATH=${SITE:+$SITE:$(bash examples/gpu/source_path.sh):}$PWD UCX_WARN_UNUSED_ENV_VARS=n
case "$STEP" in pd-*|ttft|layers-ttft|decode)
  MODEL8B=${MODEL8B:?set MODEL8B to a directory with a Llama-3.1-8B config.json and tokenizer} ;; esac
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
case "$STEP" in
  transfer)
    python3 examples/benchmarks/bench_handoff_gpu.py --json "$OUT/handoff.json" 2>&1 | tee "$OUT/handoff.txt"
    for w in 1 8; do
      python3 examples/benchmarks/bench_handoff_gpu.py --paths ucx-gpu,ucx-host --window "$w" \
        --json "$OUT/handoff_window$w.json" 2>&1 | tee -a "$OUT/handoff.txt"
    done
    python3 examples/benchmarks/bench_handoff_gpu.py --paths ucx-gpu --chunk-tokens 1024 \
      --json "$OUT/handoff_chunk1024.json" 2>&1 | tee -a "$OUT/handoff.txt"
    python3 -m pdrun.launch profile transfer --transport tcp,ucx --memory host,cuda --json "$OUT/profile_transfer_gpu.json" \
      --plot "$OUT/profile_transfer_gpu.png" 2>&1 | tail -25 | tee "$OUT/profile_transfer.txt" ;;
  pd-ucx|pd-tcp)  # PDRUN_GPU_STAGING=host: staged in host memory; PDRUN_GPU_LAYERWISE=1: copied out layer by layer
    PDRUN_GPU_TRANSPORT=${STEP#pd-} PDRUN_GPU_MODEL=$MODEL8B PDRUN_TEST_LOGS=$OUT/logs-$STEP \
      python3 -m pytest -m gpu tests/gpu -x -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/$STEP.txt" ;;
  ttft)
    bash examples/gpu/ttft_pd_vs_plain.sh "$MODEL8B" 16384 ucx "$OUT/ttft" 2>&1 | tail -40 | tee "$OUT/ttft.txt" ;;
  layers)
    for by in "" "--by-layer"; do
      python3 examples/benchmarks/bench_handoff_gpu.py --rounds 5 --paths ucx-gpu,ucx-host,tcp $by \
        --json "$OUT/handoff${by:+_by_layer}.json" 2>&1 | tail -7
    done | tee "$OUT/layers_handoff.txt" ;;
  layers-ttft)
    for lw in 0 1; do
      LAYERWISE=$lw bash examples/gpu/ttft_pd_vs_plain.sh "$MODEL8B" 16384 ucx "$OUT/ttft_layerwise$lw" 2>&1 | tail -3
    done | tee "$OUT/layers_ttft.txt" ;;
  diagnose)
    B=(python3 examples/benchmarks/bench_handoff_gpu.py --rounds 5)
    "${B[@]}" --paths ucx-gpu --profile --json "$OUT/diag_profile.json" 2>&1 | tee "$OUT/diag_profile.txt" | tail -45
    for v in "base:" "wire:--wire-only" "chunk1024:--chunk-tokens 1024" "torch:"; do
      name=${v%%:*}; read -r -a extra <<< "${v#*:}"
      copy=auto; [ "$name" = torch ] && copy=torch
      PDRUN_BLOCK_COPY=$copy "${B[@]}" --paths ucx-gpu "${extra[@]}" --json "$OUT/diag_$name.json" 2>&1 \
        | grep -A1 " path " | tail -1 | sed "s/^/$name /"
    done | tee "$OUT/diagnose.txt"
    "${B[@]}" --paths ucx-host,ucx-host-host --json "$OUT/diag_host.json" 2>&1 | tail -4 | tee -a "$OUT/diagnose.txt"
    UCX_PROTO_INFO=y "${B[@]}" --rounds 1 --tokens 2048 --paths ucx-host,ucx-host-host --json "$OUT/diag_proto.json" 2>&1 \
      | grep -iE "rndv|zcopy|copy|ppln|\| *[0-9]" | sort | uniq -c | sort -rn | head -40 | tee "$OUT/diag_proto.txt" ;;
  decode)
    python3 -m pdrun.launch bench --model "$MODEL8B" --systems plain,pdrun-1p1d --workloads decode --gpus 0,1 \
      --per-gpu 2 --gpu-blocks 16384 --max-model-len 20480 --decode-length 4096 --decode-concurrency 8,16,32 \
      --rounds 3 --transport ucx --out "$OUT/decode" 2>&1 | tail -30 | tee "$OUT/decode.txt" ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
