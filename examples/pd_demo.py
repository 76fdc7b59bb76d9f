"""1 prefiller + 1 decoder on CPU with the embedded tiny model, next to a plain vLLM to compare with.

Starts three vLLM servers (about 90 s on 2 cores), then sends a completion and a chat completion
the way pdrun's proxy does: the prompt to the prefiller with max_tokens=1, its kv_transfer_params
to the decoder. Prints both answers, whether they equal the plain vLLM's, and how much KV the
decoder loaded instead of recomputing. Everything is stopped on exit, Ctrl-C included.

    python examples/pd_demo.py [--model DIR] [--tokens 2000] [--logs DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import tiny_model
from launch.vllm_server import ServerSpec, VllmServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def counter(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines() if line.startswith(name + "{")
        )


def pd_request(prefiller: str, decoder: str, path: str, body: dict) -> tuple[dict, float, float]:
    t0 = time.perf_counter()
    first = post(prefiller, path, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    t1 = time.perf_counter()
    out = post(decoder, path, {**body, "kv_transfer_params": first["kv_transfer_params"]})
    return out, t1 - t0, time.perf_counter() - t1


def text_of(response: dict) -> str:
    choice = response["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a model directory (default: build the tiny model)")
    ap.add_argument("--tokens", type=int, default=2000, help="length of the long completion prompt")
    ap.add_argument("--logs", type=Path, default=None, help="where the servers' logs go (default: a temp dir)")
    args = ap.parse_args()

    model = str(args.model or tiny_model.build())
    logs = args.logs or Path(tempfile.mkdtemp(prefix="pdrun-demo-"))
    common = dict(model=model, dtype="float32", max_model_len=4096)
    servers = {
        "prefiller": VllmServer(
            ServerSpec(port=free_port(), role="kv_producer", kv_port=free_port(), **common), logs / "prefiller.log"
        ),
        "decoder": VllmServer(
            ServerSpec(port=free_port(), role="kv_consumer", kv_port=free_port(), **common), logs / "decoder.log"
        ),
        "plain": VllmServer(ServerSpec(port=free_port(), **common), logs / "plain.log"),
    }
    try:
        t0 = time.monotonic()
        for s in servers.values():
            s.start()
        print(f"starting prefiller, decoder and a plain vLLM for comparison on CPU (logs: {logs})", flush=True)
        for name, s in servers.items():
            s.wait_healthy()
            print(f"  {name:9} healthy on {s.url} after {time.monotonic() - t0:.0f}s", flush=True)
        p, d, b = (servers[k].url for k in ("prefiller", "decoder", "plain"))

        rng = random.Random(0)
        long_prompt = [rng.randrange(5, 8192) for _ in range(args.tokens)]
        requests = [
            (
                "completion",
                "/v1/completions",
                {"model": "tiny", "prompt": long_prompt, "max_tokens": 32, "temperature": 0},
            ),
            (
                "chat",
                "/v1/chat/completions",
                {
                    "model": "tiny",
                    "max_tokens": 32,
                    "temperature": 0,
                    "messages": [
                        {"role": "system", "content": "You are a terse Python reviewer. " * 20},
                        {"role": "user", "content": "def add(a, b):\n    return a + b\n"},
                    ],
                },
            ),
        ]
        all_equal = True
        for label, path, body in requests:
            loaded_before = counter(d, "pdrun:loaded_tokens_total")
            out, prefill_s, decode_s = pd_request(p, d, path, body)
            plain = post(b, path, body)
            time.sleep(0.5)  # counters are exported a step after the response
            loaded = counter(d, "pdrun:loaded_tokens_total") - loaded_before
            same = text_of(out) == text_of(plain)
            all_equal &= same
            print(
                f"\n{label}: {out['usage']['prompt_tokens']} prompt tokens, prefill {prefill_s * 1e3:.0f} ms on the "
                f"prefiller, decode {decode_s * 1e3:.0f} ms on the decoder, {loaded:.0f} tokens of KV loaded"
            )
            print(f"  PD     : {text_of(out)!r}")
            print(f"  plain  : {text_of(plain)!r}")
            print(f"  {'identical' if same else 'DIFFERENT'} (greedy)")
        sys.exit(0 if all_equal else 1)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        for s in servers.values():
            s.stop()
        print("stopped all servers")


if __name__ == "__main__":
    main()
