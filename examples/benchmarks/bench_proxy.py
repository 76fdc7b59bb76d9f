"""What pdrun's proxy adds to a request: the same streamed completion sent straight to a backend
and through `pdrun proxy` in front of it, interleaved, for prompts of several lengths (token ids).

The backend is a stub that answers at once as a vLLM decoder does (a stream of a few events), so
the difference is the proxy's own time: parsing the request, routing, the upstream request,
relaying the stream. Runs anywhere (no GPU, no model).

    python examples/benchmarks/bench_proxy.py --tokens 1024,16384 --rounds 50 --json proxy.json
    python examples/benchmarks/bench_proxy.py --decoders 2   # two decoders alone: the proxy reads each
                                                              # prompt to pick the one it sent most of it
    python examples/benchmarks/bench_proxy.py --profile      # the proxy under cProfile, top functions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pdrun.launch.supervisor import answers_health
from pdrun.launch.systems import free_port
from pdrun.launch.workloads import Target, _closed_loop, prompt, quantile

sys.path.insert(0, os.path.dirname(__file__))
from bench_warm import measure
from common import write_json

STUB = """
import asyncio, json, sys
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import uvicorn

app = FastAPI()
INTERVAL = float(sys.argv[2])  # seconds between streamed tokens, as a decoder's step

@app.get("/health")
async def health():
    return JSONResponse({})

@app.get("/v1/models")
async def models():
    return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

def choice(i, last, prompt=None):
    return {"index": 0, "text": f" t{i}", "token_ids": [100 + i], "logprobs": None, "prompt_token_ids": prompt,
            "finish_reason": "length" if last else None, "stop_reason": None}

@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    n = body.get("max_tokens") or 1
    head = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub"}
    if not body.get("stream"):  # a prefill: one token, and a hand-off for the decoder
        params = {"pdrun": {"num_tokens": len(body["prompt"])}} if (body.get("kv_transfer_params") or {}).get(
            "do_remote_decode") else None
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1, "total_tokens": len(body["prompt"]) + 1}
        return JSONResponse({**head, "choices": [choice(0, True, body["prompt"])], "usage": usage,
                             "kv_transfer_params": params})
    async def events():
        for i in range(n):
            if i and INTERVAL:
                await asyncio.sleep(INTERVAL)
            first = body["prompt"] if i == 0 and body.get("return_token_ids") else None
            yield "data: " + json.dumps({**head, "choices": [choice(i, i == n - 1, first)]}) + "\\n\\n"
        yield "data: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not answers_health(f"{url}/health"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(0.2)


async def relay(
    targets: dict[str, Target], streams: int, prompt_tokens: int, output: int, rounds: int
) -> dict[str, list[float]]:
    """Each target's per-request TPOTs: `streams` paced streams at once, the targets taking turns."""
    rng = random.Random(0)
    tpots: dict[str, list[float]] = {name: [] for name in targets}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=4 * streams)) as client:
        for _ in range(rounds):
            prompts = [prompt(rng, prompt_tokens) for _ in range(streams)]
            for name, target in targets.items():
                outcomes, _ = await _closed_loop(client, target, prompts, output, streams)
                tpots[name] += [o.tpot for o in outcomes if o.tpot is not None]
    return tpots


def start_proxy(port: int, backends: list[str], profile: Path | None) -> subprocess.Popen[bytes]:
    cmd = ["-m", "pdrun.launch", "proxy", *backends, "--port", str(port)]
    if profile is not None:
        cmd = ["-m", "cProfile", "-o", str(profile), *cmd]
    return subprocess.Popen([sys.executable, *cmd])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,16384", help="prompt lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--output", type=int, default=4, help="tokens the stub streams per request")
    ap.add_argument("--streams", type=int, default=0, help="relay mode: this many streams at once (0: TTFT mode)")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="relay mode: the stub's time between tokens")
    ap.add_argument("--decoders", type=int, default=1, help="TTFT mode: the proxy in front of this many stubs")
    ap.add_argument("--profile", action="store_true", help="run the proxy under cProfile; print its top functions")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    stub_ports, proxy_port, pd_port = [free_port() for _ in range(max(1, args.decoders))], free_port(), free_port()
    stub_urls = [f"http://127.0.0.1:{port}" for port in stub_ports]
    stub_url = stub_urls[0]
    tmp = Path(tempfile.mkdtemp(prefix="pdrun-bench-proxy-"))
    (tmp / "stub.py").write_text(STUB)
    interval = args.interval_ms / 1e3 if args.streams else 0.0
    stubs = [subprocess.Popen([sys.executable, str(tmp / "stub.py"), str(port), str(interval)]) for port in stub_ports]
    profile = tmp / "proxy.prof" if args.profile else None
    proxies = {"proxy": (proxy_port, start_proxy(proxy_port, ["--decode", ",".join(stub_urls)], profile))}
    if args.streams:  # the stub as a prefiller too: the stream continues after its first token
        proxies["proxy-pd"] = (pd_port, start_proxy(pd_port, ["--prefill", stub_url, "--decode", stub_url], None))
    figures: dict[str, dict[str, float | None]] = {}
    try:
        for url in stub_urls:
            wait_up(url)
        targets = {"backend": Target(stub_url, "stub")}
        for name, (port, _) in proxies.items():
            wait_up(f"http://127.0.0.1:{port}")
            targets[name] = Target(f"http://127.0.0.1:{port}", "stub")
        if args.streams:
            n = int(args.tokens.split(",")[0])
            print(f"TPOT of {args.streams} streams at once, {args.output} tokens every {args.interval_ms} ms, "
                  f"{n}-token prompts, {args.rounds} rounds (ms: median [p10 - p90])")  # fmt: skip
            tpots = asyncio.run(relay(targets, args.streams, n, args.output, args.rounds))
            for name, values in tpots.items():
                med, p10, p90 = (1e3 * (quantile(values, q) or 0.0) for q in (0.5, 0.1, 0.9))
                figures[name] = {"tpot_ms": med, "p10_ms": p10, "p90_ms": p90}
                print(f"  {name:>9} {med:7.3f} [{p10:.3f} - {p90:.3f}]")
        else:
            print(f"{'tokens':>7} {'backend ms':>11} {'proxy ms':>9} {'added ms':>9}  (median TTFT of {args.rounds})")
            for n in (int(x) for x in args.tokens.split(",")):
                ttfts, _ = asyncio.run(measure(targets, n, args.rounds, args.output))
                b, p = (quantile([t for t in ttfts[k] if t is not None], 0.5) for k in ("backend", "proxy"))
                assert b is not None and p is not None
                figures[str(n)] = {"backend_ms": b * 1e3, "proxy_ms": p * 1e3, "added_ms": (p - b) * 1e3}
                print(f"{n:>7} {b * 1e3:>11.2f} {p * 1e3:>9.2f} {(p - b) * 1e3:>9.2f}")
    finally:
        for _, proc in proxies.values():
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        for stub in stubs:
            stub.terminate()
            stub.wait(timeout=30)
    if profile is not None:
        import pstats

        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
    if args.json:
        mode = {"streams": args.streams, "interval_ms": args.interval_ms, "output": args.output} if args.streams else {}
        write_json(args.json, {"benchmark": "proxy_relay" if args.streams else "proxy_tax", "rounds": args.rounds,
                               "decoders": args.decoders, **mode, "figures": figures})  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
