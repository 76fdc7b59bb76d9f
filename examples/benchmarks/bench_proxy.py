"""What pdrun's proxy adds to a request: the same streamed completion sent straight to a backend
and through `pdrun proxy` in front of it, interleaved, for prompts of several lengths (token ids).

The backend is a stub that answers at once as a vLLM decoder does (a stream of a few events), so
the difference is the proxy's own time: parsing the request, routing, the upstream request,
relaying the stream. Runs anywhere (no GPU, no model).

    python examples/benchmarks/bench_proxy.py --tokens 1024,16384 --rounds 50 --json proxy.json
    python examples/benchmarks/bench_proxy.py --profile      # the proxy under cProfile, top functions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdrun.launch.supervisor import answers_health
from pdrun.launch.systems import free_port
from pdrun.launch.workloads import Target, quantile

sys.path.insert(0, os.path.dirname(__file__))
from bench_warm import measure
from common import write_json

STUB = """
import json, sys
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import uvicorn

app = FastAPI()

@app.get("/health")
async def health():
    return JSONResponse({})

@app.get("/v1/models")
async def models():
    return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    n = body.get("max_tokens") or 1
    def events():
        for i in range(n):
            choice = {"index": 0, "text": f" t{i}", "token_ids": [100 + i], "logprobs": None,
                      "finish_reason": "length" if i == n - 1 else None, "stop_reason": None}
            yield "data: " + json.dumps({"id": "cmpl-stub", "object": "text_completion", "created": 0,
                                         "model": "stub", "choices": [choice]}) + "\\n\\n"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,16384", help="prompt lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--output", type=int, default=4, help="tokens the stub streams per request")
    ap.add_argument("--profile", action="store_true", help="run the proxy under cProfile; print its top functions")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    stub_port, proxy_port = free_port(), free_port()
    stub_url, proxy_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{proxy_port}"
    tmp = Path(tempfile.mkdtemp(prefix="pdrun-bench-proxy-"))
    (tmp / "stub.py").write_text(STUB)
    stub = subprocess.Popen([sys.executable, str(tmp / "stub.py"), str(stub_port)])
    proxy_cmd = ["-m", "pdrun.launch", "proxy", "--decode", stub_url, "--port", str(proxy_port)]
    if args.profile:
        proxy_cmd = ["-m", "cProfile", "-o", str(tmp / "proxy.prof"), *proxy_cmd]
    proxy = subprocess.Popen([sys.executable, *proxy_cmd])
    figures: dict[str, dict[str, float | None]] = {}
    try:
        wait_up(stub_url)
        wait_up(proxy_url)
        targets = {"backend": Target(stub_url, "stub"), "proxy": Target(proxy_url, "stub")}
        print(f"{'tokens':>7} {'backend ms':>11} {'proxy ms':>9} {'added ms':>9}  (median TTFT of {args.rounds})")
        for n in (int(x) for x in args.tokens.split(",")):
            ttfts, _ = asyncio.run(measure(targets, n, args.rounds, args.output))
            b, p = (quantile(ttfts[k], 0.5) for k in ("backend", "proxy"))
            assert b is not None and p is not None
            figures[str(n)] = {"backend_ms": b * 1e3, "proxy_ms": p * 1e3, "added_ms": (p - b) * 1e3}
            print(f"{n:>7} {b * 1e3:>11.2f} {p * 1e3:>9.2f} {(p - b) * 1e3:>9.2f}")
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.wait(timeout=30)
        stub.terminate()
        stub.wait(timeout=30)
    if args.profile:
        import pstats

        pstats.Stats(str(tmp / "proxy.prof")).sort_stats("tottime").print_stats(25)
    if args.json:
        write_json(args.json, {"benchmark": "proxy_tax", "rounds": args.rounds, "figures": figures})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
