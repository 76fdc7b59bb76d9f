"""`pdrun bench`: the systems named, driven by the workloads named, side by side; JSON, a markdown
table and a PNG.

Method: systems that fit on the GPUs at once start together (a wave) and keep running for all
their workloads; within a wave, each round runs every workload on each system in turn (A B A B),
so a drift of the machine falls on all of them alike. Start-up is not measured. Every figure is
reported as the median of its rounds with their minimum and maximum, and as a ratio to `plain`'s
median (measured in the same run). The machine, its GPUs, the versions and the command are written
into the JSON.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from pdrun.launch import systems as sysmod
from pdrun.launch import workloads as wl
from pdrun.launch.kills import DecoderKill

START_S = {"cpu": 90.0, "cuda": 150.0}  # start-up of a wave, for the estimate
PREFILL_TOK_S = {"cpu": 4000.0, "cuda": 30000.0}  # for the estimate only
DECODE_TOK_S = {"cpu": 300.0, "cuda": 3000.0}
KILL_WORKLOADS = ("noreuse", "slo")  # where --kill-decoder kills a decoder: requests in flight all along


@dataclass
class Sizes:
    reuse: wl.ReuseSizes = field(default_factory=wl.ReuseSizes)
    multiturn: wl.MultiturnSizes = field(default_factory=wl.MultiturnSizes)
    noreuse: wl.NoreuseSizes = field(default_factory=wl.NoreuseSizes)
    slo: wl.SloSizes = field(default_factory=wl.SloSizes)
    decode: wl.DecodeSizes = field(default_factory=wl.DecodeSizes)

    def fit(self, max_len: int) -> Sizes:
        """The same workloads with every prompt and answer inside a context of `max_len` tokens."""
        r, m, n, s, d = self.reuse, self.multiturn, self.noreuse, self.slo, self.decode
        longest_out = s.output[1]
        lo, hi = s.prompt
        return Sizes(
            reuse=replace(r, tokens=min(r.tokens, max_len - r.output)),
            multiturn=replace(m, max_history=min(m.max_history, max_len)),
            noreuse=replace(n, lengths=tuple(sorted({min(x, max_len - n.output) for x in n.lengths}))),
            slo=replace(s, prompt=(min(lo, (max_len - longest_out) // 4), min(hi, max_len - longest_out))),
            decode=replace(d, length=min(d.length, max_len - d.output)),
        )


@dataclass
class Plan:
    waves: list[list[tuple[str, list[int]]]]  # systems started together, with their GPUs
    skipped: dict[str, str]  # system -> why it does not run here
    workloads: list[str]
    rounds: int
    device: str
    per_gpu: int = 1
    share_gpus: bool = False
    estimate_s: float = 0.0
    kill_decoder_s: float | None = None  # seconds into each KILL_WORKLOADS run at which a decoder dies
    kills: dict[str, str] = field(default_factory=dict)  # system -> the decoder killed
    spared: dict[str, str] = field(default_factory=dict)  # system -> why it gets no kill


class BenchError(Exception):
    """A bench that cannot be planned or run: the message says what to change."""


def context_length(model: str | None) -> int | None:
    """The context a model directory's config.json allows; None where it does not say."""
    if model is None:
        return None
    try:
        config = json.loads((Path(model) / "config.json").read_text())
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan(
    names: list[str],
    workloads: list[str],
    gpus: list[int],
    rounds: int,
    device: str,
    sizes: Sizes,
    per_gpu: int = 1,
    share_gpus: bool = False,
    kill_decoder_s: float | None = None,
) -> Plan:
    """Waves of systems that fit on `gpus` together, `plain` first; `per_gpu` instances may share a
    GPU (an idle system computes nothing, so systems measured in turn do not disturb each other),
    and with `share_gpus` so may the instances of one system (what a cache or a route saves, not
    what more GPUs compute). On CPU `gpus` are slots: how many vLLM instances run at once. With
    `kill_decoder_s`, which systems get a decoder killed that long into noreuse and slo."""
    unknown = [w for w in workloads if w not in wl.WORKLOADS]
    if unknown:
        raise BenchError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(wl.WORKLOADS)}")
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if len(set(names)) != len(names):
        raise BenchError(f"a system is named twice in {','.join(names)}")
    kinds = {n: sysmod.split(n)[0] for n in names}
    largest = max((sysmod.gpus_needed(n) for n in names if kinds[n].startswith("pdrun-")), default=2)
    need = {n: sysmod.gpus_needed(n, largest) for n in names}
    skipped = {n: why for n in names if (why := sysmod.unavailable(n)) is not None}
    if per_gpu < 1:
        raise BenchError("--per-gpu must be at least 1")
    room = len(gpus) * per_gpu if share_gpus else len(gpus)
    for n, k in need.items():
        if k > room and n not in skipped:
            skipped[n] = f"needs {k} GPUs, {len(gpus)} given" + (f" ({per_gpu} instances each)" if share_gpus else "")
    ordered = sorted((n for n in names if n not in skipped), key=lambda n: n != "plain")
    waves: list[list[tuple[str, list[int]]]] = []
    free: list[list[int]] = []  # each wave's GPU slots not taken yet

    def take(slots: list[int], k: int) -> list[int] | None:
        """k slots on k different GPUs (with share_gpus, on as few as have room), the least used first."""
        picked: list[int] = []
        left = list(slots)
        while len(picked) < k and left:
            g = max(sorted(set(left)), key=left.count)  # the most free slots; the lowest id of those
            picked.append(g)
            if share_gpus:
                left.remove(g)
            else:
                left = [x for x in left if x != g]
        return sorted(picked) if len(picked) == k else None

    for n in ordered:  # the first wave with room: systems side by side, in the order named
        fits = [(k, got) for k, slots in enumerate(free) if (got := take(slots, need[n])) is not None]
        if fits:
            k, got = fits[0]
        else:
            waves.append([])
            free.append([g for g in gpus for _ in range(per_gpu)])
            k, got = len(waves) - 1, take(free[-1], need[n])
        assert got is not None
        waves[k].append((n, got))
        for g in got:
            free[k].remove(g)
    p = Plan(waves, skipped, list(workloads), rounds, device, per_gpu=per_gpu, share_gpus=share_gpus)
    if kill_decoder_s is not None:
        _check_kill(kill_decoder_s, workloads)
        p.kill_decoder_s = kill_decoder_s
        p.kills, p.spared = decoder_kills([n for wave in waves for n, _ in wave])
    p.estimate_s = estimate(p, sizes)
    return p


def _check_kill(after_s: float, workloads: list[str]) -> None:
    if after_s < 0:
        raise BenchError(f"--kill-decoder takes seconds >= 0, not {after_s:g}")
    if not set(workloads) & set(KILL_WORKLOADS):
        raise BenchError(f"--kill-decoder kills during {' and '.join(KILL_WORKLOADS)}: add one to --workloads")


def decoder_kills(names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The systems that get a decoder killed (system -> its last decoder), and those that do not
    (system -> why): a kill needs another decoder to take the requests over."""
    kills: dict[str, str] = {}
    spared: dict[str, str] = {}
    for name in names:
        shape = sysmod.pd_shape(name)
        if shape is None:
            spared[name] = "not a pdrun deployment"
        elif shape[1] < 2:
            spared[name] = "one decoder, none to take its requests over"
        else:
            kills[name] = sysmod.last_decoder(shape[1])
    return kills, spared


def estimate(p: Plan, sizes: Sizes) -> float:
    """Seconds the plan takes, roughly: start-ups, then every workload's tokens at typical rates."""
    pre, dec = PREFILL_TOK_S[p.device], DECODE_TOK_S[p.device]
    per_system = 0.0
    r, m, n, s = sizes.reuse, sizes.multiturn, sizes.noreuse, sizes.slo
    if "reuse" in p.workloads:
        per_system += (3 + r.evictors) * r.tokens / pre
    if "multiturn" in p.workloads:
        turn = (sum(m.output) / 2) / dec * 4 + sum(m.think) / 2
        users, mean_turns = max(1, m.users), sum(m.turns) / 2
        # it ends with its slowest user: the last of its conversations dealt out may be a longest one
        slowest = (math.ceil(m.conversations / users) - 1) * mean_turns + max(m.turns)
        per_system += turn * max(m.conversations * mean_turns / users, slowest)
    if "noreuse" in p.workloads:
        per_system += sum(L * c * n.prompts_per_user / pre + n.output * n.prompts_per_user / dec * 8
                          for L in n.lengths for c in n.concurrency)  # fmt: skip
    if "slo" in p.workloads:
        per_system += len(s.rates) * (s.duration_s + sum(s.output) / 2 / dec * 20)
    if "decode" in p.workloads:
        d = sizes.decode
        per_system += sum(d.length * c / pre + d.output / dec * 8 for c in d.concurrency)
    systems = sum(len(w) for w in p.waves)
    restarts = systems * r.restarts * START_S[p.device] if "reuse" in p.workloads else 0.0
    return len(p.waves) * START_S[p.device] + systems * p.rounds * per_system + restarts


def describe(p: Plan, sizes: Sizes) -> str:
    lines = []
    for i, wave in enumerate(p.waves, 1):
        parts = [f"{n} (GPU {','.join(map(str, g))})" if p.device == "cuda" else n for n, g in wave]
        lines.append(f"wave {i}: {', '.join(parts)}")
    for n, why in p.skipped.items():
        lines.append(f"not run: {n}: {why}")
    lines += _kill_lines(p)
    lines.append(
        f"{', '.join(p.workloads)} x {p.rounds} rounds: about {p.estimate_s / 60:.0f} min"
        f"{' (start-ups included)' if p.waves else ''}"
    )
    lines += [f"  {w}: {sends(w, sizes)}" for w in p.workloads]
    return "\n".join(lines)


def _kill_lines(p: Plan) -> list[str]:
    """Who gets --kill-decoder's kill, and who does not, with why."""
    if p.kill_decoder_s is None:
        return []
    during = " and ".join(w for w in p.workloads if w in KILL_WORKLOADS)
    lines = [
        f"kill: {n}'s {decoder}, {p.kill_decoder_s:g} s into {during} of every round (its supervisor restarts it)"
        for n, decoder in p.kills.items()
    ]
    return lines + [f"no kill: {n}: {why}" for n, why in p.spared.items()]


def sends(workload: str, sizes: Sizes) -> str:
    """What a workload sends, in a line."""
    span = "{0[0]} - {0[1]}".format
    if workload == "reuse":
        r = sizes.reuse
        after = f", after each of {r.restarts} full restarts" if r.restarts else ""
        hot = f", {r.hot} times more (hot)" if r.hot else ""
        return f"a {r.tokens}-token prompt cold, warm{hot}, after other prompts evict it{after}"
    if workload == "multiturn":
        m = sizes.multiturn
        reading = f", reading {span(m.think)} s between turns" if any(m.think) else ", back to back"
        return (
            f"{m.conversations} conversations, {m.users} at once, {span(m.turns)} turns of {span(m.user)} new tokens "
            f"over a {m.system}-token system prompt, {span(m.output)} out{reading}; histories up to {m.max_history}"
        )
    if workload == "noreuse":
        n = sizes.noreuse
        lengths, at_once = ", ".join(map(str, n.lengths)), ", ".join(map(str, n.concurrency))
        return f"new {lengths}-token prompts, {at_once} at once, {n.output} out"
    if workload == "slo":
        o = sizes.slo
        return (
            f"{span(o.prompt)}-token prompts at {', '.join(map(str, o.rates))} per s per GPU, {span(o.output)} out; "
            f"objectives TTFT {o.ttft_s} s, TPOT {o.tpot_s * 1000:g} ms"
        )
    d = sizes.decode
    at_once = ", ".join(map(str, d.concurrency))
    return f"{at_once} requests decoding {d.output} tokens at once over {d.length}-token prompts"


# ---- running ----

Results = dict[str, dict[str, dict[str, list[float]]]]  # system -> workload -> figure -> one value per round


def run(
    p: Plan,
    settings: sysmod.Settings,
    sizes: Sizes,
    out: Path,
    say: Callable[[str], None] = print,
    start_timeout_s: float = 900.0,
    measured: Callable[[Results, dict[str, str]], None] = lambda results, failed: None,
) -> tuple[Results, dict[str, str]]:
    """Every wave: start its systems, the rounds, stop them. Returns the figures, and the systems
    that failed with why (a failed system is reported, the others go on). `measured` is given the
    figures and failures so far after each measurement and failure (to keep them if the run stops)."""
    results: Results = {}
    failed: dict[str, str] = {}

    def fail(name: str, why: str) -> None:
        """The system is out of the run: why, kept with the figures so far, and said."""
        failed[name] = why
        measured(results, failed)
        say(f"  {name}: failed: {why}")

    for i, wave in enumerate(p.waves, 1):
        (out / "logs").mkdir(parents=True, exist_ok=True)
        share = None
        if settings.cache_disk_gb is None:  # launch's, unless the disk cannot hold every tier's
            share = sysmod.disk_share(out / "logs", sum(sysmod.persists(n) for n, _ in wave))
        wave_settings = replace(settings, cache_disk_gb=share) if share is not None else settings
        started = [sysmod.make(n, g, wave_settings, out / "logs", restart_instances=n in p.kills) for n, g in wave]
        try:
            t0 = time.monotonic()
            for s in started:
                s.start()
            for s in list(started):
                try:
                    s.wait_ready(start_timeout_s)
                except sysmod.SystemFailure as e:
                    fail(s.name, f"did not start: {e}")
                    s.stop()
                    started.remove(s)
            say(f"wave {i}: {', '.join(s.name for s in started)} ready after {time.monotonic() - t0:.0f}s")
            sized = {s.name: _sized(s, sizes, say) if "reuse" in p.workloads else sizes for s in started}
            longs: dict[str, list[int]] = {}
            for r in range(p.rounds):
                for workload in p.workloads:
                    for s in started:
                        if s.name in failed:
                            continue
                        t1 = time.monotonic()
                        sent: list[wl.Outcome] = []
                        try:
                            kill = _kill(p, workload, s, start_timeout_s, say)
                            figures, long = _measured(
                                workload, s, settings, sized[s.name], seed(r, workload), kill, sent
                            )
                        except (wl.WorkloadError, sysmod.SystemFailure, httpx.HTTPError, OSError, TimeoutError) as e:
                            fail(s.name, f"{workload}, round {r + 1}: {type(e).__name__}: {e}")
                            continue
                        finally:
                            write_requests(out / "requests" / s.name / f"{workload}-round{r + 1}.jsonl", sent)
                        if long is not None:
                            longs[s.name] = long
                        _add(results, s.name, workload, figures)
                        measured(results, failed)
                        say(f"  round {r + 1} {workload} {s.name}: {time.monotonic() - t1:.0f}s {_brief(figures)}")
            restarts = sizes.reuse.restarts if "reuse" in p.workloads else 0
            for _ in range(restarts):
                # Every system restarted and asked for the prompt again: a disk tier reloads it where
                # that pays, the others recompute it, each as the first request of a fresh start.
                for s in started:
                    if s.name in failed or s.name not in longs:
                        continue
                    try:
                        s.restart(start_timeout_s)
                        target = wl.Target(s.url, settings.served_name)
                        before = s.counters()
                        figures = asyncio.run(wl.after_restart(target, longs[s.name], sized[s.name].reuse))
                        figures |= {f"restart_{k}": v for k, v in moved(before, s.counters()).items()}
                    except (sysmod.SystemFailure, wl.WorkloadError, httpx.HTTPError, OSError) as e:
                        fail(s.name, f"reuse after a full restart: {type(e).__name__}: {e}")
                        continue
                    _add(results, s.name, "reuse", figures)
                    measured(results, failed)
                    say(f"  {s.name} after a full restart: {_brief(figures)}")
        finally:
            for s in started:
                s.stop()
    return results, failed


def seed(round_: int, workload: str) -> int:
    """The prompts' seed: the same for every system (they answer the same prompts), another for
    each round and workload (a workload's prompts never start with another's)."""
    return 1000 * round_ + wl.WORKLOADS.index(workload)


def _sized(s: sysmod.System, sizes: Sizes, say: Callable[[str], None]) -> Sizes:
    """The sizes for this system: `reuse` sends enough other prompts to fill its largest KV cache."""
    capacity = s.kv_capacity_tokens()
    r = sizes.reuse
    if capacity is None:
        return sizes
    evictors = max(r.evictors, -(-capacity // r.tokens) + 1)
    if evictors > r.evictors:
        say(f"  {s.name}: its KV cache holds {capacity} tokens: reuse sends {evictors} other prompts to evict"
            f"{' (--gpu-blocks makes it smaller)' if evictors > 8 else ''}")  # fmt: skip
    return replace(sizes, reuse=replace(r, evictors=evictors))


def _kill(
    p: Plan, workload: str, s: sysmod.System, rejoin_timeout_s: float, say: Callable[[str], None]
) -> DecoderKill | None:
    """The decoder kill planned for this workload on this system, if there is one."""
    if p.kill_decoder_s is None or workload not in KILL_WORKLOADS or s.name not in p.kills:
        return None
    assert isinstance(s, sysmod.PdrunSystem)
    return DecoderKill(s, workload, p.kill_decoder_s, rejoin_timeout_s, say)


def _measured(
    workload: str,
    s: sysmod.System,
    settings: sysmod.Settings,
    sizes: Sizes,
    seed: int,
    kill: DecoderKill | None,
    sent: list[wl.Outcome],
) -> tuple[dict[str, float], list[int] | None]:
    """The workload's figures and what it moved the system's counters by, its requests' outcomes
    kept in `sent`; with `kill`, a decoder killed during it, failed requests counted, and the
    decoder's return."""
    if kill is None:
        before = s.counters()
        figures, long = _one(workload, s, wl.Target(s.url, settings.served_name, requests=sent), sizes, seed)
        return figures | moved(before, s.counters()), long
    before, before_survivors = s.counters(), s.counters(kill.survivors)
    target = wl.Target(s.url, settings.served_name, count_failures=True, requests=sent)
    with kill:
        figures, long = _one(workload, s, target, sizes, seed)
    figures |= kill.figures()
    # A killed decoder's counters start again from 0: what it counted before its death is lost.
    return figures | moved(before_survivors if kill.killed else before, s.counters()), long


def _one(
    workload: str, s: sysmod.System, target: wl.Target, sizes: Sizes, seed: int
) -> tuple[dict[str, float], list[int] | None]:
    if workload == "reuse":
        return asyncio.run(wl.reuse(target, sizes.reuse, seed, s.serving_urls))
    if workload == "multiturn":
        return asyncio.run(wl.multiturn(target, sizes.multiturn, seed)), None
    if workload == "noreuse":
        return asyncio.run(wl.noreuse(target, sizes.noreuse, seed)), None
    if workload == "decode":
        return asyncio.run(wl.decode(target, sizes.decode, seed, s.instance_urls)), None
    return asyncio.run(wl.slo(target, sizes.slo, len(s.gpus), seed)), None


def write_requests(path: Path, sent: list[wl.Outcome]) -> None:
    """Each request a workload sent, one JSON line each in the order they were sent, times from
    the first: where a figure's median hides which requests were slow."""
    if not sent:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    start = min(o.sent for o in sent)
    lines = (json.dumps(o.record(start)) for o in sorted(sent, key=lambda o: o.sent))
    path.write_text("".join(f"{line}\n" for line in lines))


def _add(results: Results, system: str, workload: str, figures: dict[str, float]) -> None:
    into = results.setdefault(system, {}).setdefault(workload, {})
    for k, v in figures.items():
        into.setdefault(k, []).append(v)


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What pdrun's counters moved by over a workload, its hand-offs' bytes and seconds as their
    mean rate (each hand-off timed from its first request to its last block in place)."""
    out = {name: after[name] - before.get(name, 0.0) for name in after}
    nbytes, seconds = out.pop("handoff_bytes", 0.0), out.pop("handoff_seconds", 0.0)
    if nbytes > 0 and seconds > 0:
        out["handoff_gb_per_s"] = nbytes / seconds / 1e9
    return out


def _brief(figures: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in list(figures.items())[:4])


# ---- reporting ----


def summarize(results: Results) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Each figure's median, min and max over its rounds, and its median over `plain`'s."""
    base = results.get("plain", {})
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for system, by_workload in results.items():
        for workload, figures in by_workload.items():
            for name, values in figures.items():
                stats = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
                ref = base.get(workload, {}).get(name)
                if ref and statistics.median(ref):
                    stats["x_plain"] = stats["median"] / statistics.median(ref)
                out.setdefault(system, {}).setdefault(workload, {})[name] = stats
    return out


def markdown(summary: dict[str, Any], failed: dict[str, str], skipped: dict[str, str], meta: dict[str, Any]) -> str:
    systems = list(summary)
    lines = [f"# pdrun bench: {meta['machine']}", "", f"`{meta['command']}`", ""]
    lines.append(f"{meta['date']}; {meta['versions']}; {meta['rounds']} rounds, medians [min - max], x plain")
    if not meta.get("done", True):
        lines.append("\n**Partial**: written while the bench ran; it holds the rounds measured so far.")
    workloads = [w for w in wl.WORKLOADS if any(w in summary[s] for s in systems)]
    for w in workloads:
        counted = set(sysmod.COUNTERS.values())  # counts of what went wrong: in the tables only
        names = sorted({f for s in systems for f in summary[s].get(w, {})} - counted, key=_figure_order)
        lines += ["", f"## {w}", "", "| figure | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
        for f in names:
            cells = [_cell(summary[s].get(w, {}).get(f)) for s in systems]
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    for name, why in {**skipped, **failed}.items():
        lines.append(f"\n**{name}**: {why}")
    return "\n".join(lines) + "\n"


def _figure_order(name: str) -> tuple[str, ...]:
    return tuple(name.split("_"))


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    text = f"{stats['median']:.3g}"
    if stats["n"] > 1:
        text += f" [{stats['min']:.3g} - {stats['max']:.3g}]"
    if "x_plain" in stats:
        text += f" ({stats['x_plain']:.2f}x)"
    return text


def plot(summary: dict[str, Any], path: Path) -> bool:
    """One bar chart per workload's figures (ratios to plain where there are), the slo goodput as
    curves over the rate; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    systems = list(summary)
    workloads = [w for w in wl.WORKLOADS if any(w in summary[s] for s in systems)]
    if not workloads:
        return False
    fig, axes = plt.subplots(len(workloads), 1, figsize=(11, 3.6 * max(1, len(workloads))), squeeze=False)
    for ax, w in zip(axes[:, 0], workloads, strict=True):
        counted = set(sysmod.COUNTERS.values())  # counts of what went wrong: in the tables only
        names = sorted({f for s in systems for f in summary[s].get(w, {})} - counted, key=_figure_order)
        if w == "slo":
            goodput = [f for f in names if f.startswith("goodput")]
            rates = [float(f.rsplit("_r", 1)[1]) for f in goodput]
            for s in systems:
                ys = [summary[s].get(w, {}).get(f, {}).get("median") for f in goodput]
                ax.plot(rates, [y if y is not None else float("nan") for y in ys], marker="o", label=s)
            ax.set_xlabel("offered requests/s per GPU")
            ax.set_ylabel("goodput, requests/s per GPU")
        else:  # each figure as a ratio to plain's, where plain ran; else as measured, on a log scale
            key = "x_plain" if "plain" in systems else "median"
            shown = [s for s in systems if s != "plain"] if key == "x_plain" else systems
            width = 0.8 / max(1, len(shown))
            for k, s in enumerate(shown):
                ys = [summary[s].get(w, {}).get(f, {}).get(key, float("nan")) for f in names]
                ax.bar([i + k * width for i in range(len(names))], ys, width, label=s)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=7)
            if key == "x_plain":
                ax.axhline(1.0, color="gray", linewidth=0.8)
                ax.set_ylabel("x plain (median)")
            else:
                ax.set_yscale("log")
        ax.set_title(w)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@functools.cache  # asked after every measurement; nvidia-smi and the imports once
def machine(device: str) -> dict[str, Any]:
    """What ran the bench: host, GPUs, versions."""
    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                            "python": platform.python_version(), "cpus": os.cpu_count()}  # fmt: skip
    for name in ("vllm", "torch"):
        try:
            info[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            info[name] = None
    if device == "cuda":
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        try:
            smi = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout
            info["gpus"] = [line.strip() for line in smi.splitlines() if line.strip()]
        except OSError:
            info["gpus"] = []
    return info


def gpu_summary(gpus: list[str]) -> str:
    """'2 x NVIDIA H200 (143771 MiB, driver 580.159.04)' from nvidia-smi's lines."""
    kinds: dict[str, int] = {}
    for line in gpus:
        name, *rest = [x.strip() for x in line.split(",")]
        label = f"{name} ({rest[0]}, driver {rest[1]})" if len(rest) >= 2 else name
        kinds[label] = kinds.get(label, 0) + 1
    return ", ".join(f"{n} x {label}" for label, n in kinds.items())


def write(
    out: Path,
    p: Plan,
    settings: sysmod.Settings,
    sizes: Sizes,
    results: Results,
    failed: dict[str, str],
    done: bool = True,
) -> dict[str, Any]:
    """results.json, results.md and results.png in `out`; returns the JSON written. `done`: False
    while the bench still runs (the files then hold the rounds so far, and say so)."""
    info = machine(p.device)
    gpus = gpu_summary(info.get("gpus") or []) or f"{info['cpus']} CPUs"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["pdrun", *sys.argv[1:]]),  # `pdrun bench ...` or `python -m pdrun.launch bench ...`
        "machine": gpus,
        "versions": f"vLLM {info.get('vllm')}, torch {info.get('torch')}, Python {info['python']}",
        "rounds": p.rounds,
        "done": done,
    }  # fmt: skip
    summary = summarize(results)
    doc = {
        "meta": meta,
        "host": info,
        "plan": {
            "waves": p.waves,
            "skipped": p.skipped,
            "workloads": p.workloads,
            "rounds": p.rounds,
            "per_gpu": p.per_gpu,
            "share_gpus": p.share_gpus,
            "kill_decoder_s": p.kill_decoder_s,
            "kills": p.kills,
        },
        "settings": {k: v for k, v in vars(settings).items()},
        "sizes": {k: vars(v) for k, v in vars(sizes).items()},
        "failed": failed,
        "results": results,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.json.partial"  # replaced whole: a reader never sees half a file
    partial.write_text(json.dumps(doc, indent=1, default=str))
    partial.replace(out / "results.json")
    (out / "results.md").write_text(markdown(summary, failed, p.skipped, meta))
    plot(summary, out / "results.png")
    return doc
