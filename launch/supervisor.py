"""Keeping a deployment's processes alive: start, health, logs, restart with backoff, ordered stop.

Each child runs in its own process group (vLLM starts an engine and workers under its API server),
so a stop or a crash takes the whole group, and a restarted child never finds its port held by an
orphan of the previous one. Logs go to `<run dir>/logs/<name>.log` and, prefixed with the child's
name, to our stdout. `<run dir>/state.json` says what runs where, for people and scripts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

BACKOFF_S = (1, 2, 4, 8, 16, 30, 60)
STABLE_AFTER_S = 60.0  # healthy this long after a restart: the next crash starts the backoff over
PROGRESS_EVERY_S = 10.0
HEALTH_PROBE_TIMEOUT_S = 2.0  # a server this slow to answer its health check is not healthy now


def answers_health(url: str) -> bool:
    """Whether GET `url` answers 200 within HEALTH_PROBE_TIMEOUT_S."""
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_PROBE_TIMEOUT_S) as r:
            return r.status == 200
    except OSError:  # urllib's URLError and HTTPError included
        return False


@dataclass
class ChildSpec:
    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str
    tier: int = 1  # stopped in ascending tier order: the proxy (0) before the instances (1)


@dataclass
class Child:
    spec: ChildSpec
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    state: str = "new"  # starting, healthy, unhealthy, down, stopped
    starts: int = 0
    crashes: int = 0  # consecutive, for the backoff
    started_at: float = 0.0
    healthy_since: float | None = None
    restart_at: float | None = None
    ever_healthy: bool = False
    groups: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"----- pdrun: start #{self.starts + 1} at {stamp}: {' '.join(self.spec.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.spec.command,
                env=self.spec.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.groups.append(self.proc.pid)
        self.starts += 1
        self.state = "starting"
        self.started_at = time.monotonic()
        self.healthy_since = None
        self.restart_at = None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def probe(self) -> bool:
        return answers_health(self.spec.health_url)

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def reap(self) -> None:
        """The leader exited: kill what is left of its group and wait until it is gone."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait()
        wait_group_gone(self.proc.pid, 15)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def describe(self) -> dict[str, object]:
        return {
            "pid": self.proc.pid if self.proc else None,
            "state": self.state,
            "url": self.spec.health_url.rsplit("/", 1)[0],
            "starts": self.starts,
            "log": str(self.log_path),
        }


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes in process group `pgid`."""
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(group) == pgid and state != "Z":
                out.add(int(entry.name))
    return out


def wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class LogEcho(threading.Thread):
    """Follows the children's log files and prints each new line as `name | line`."""

    def __init__(self, children: list[Child], out: TextIO):
        super().__init__(name="pdrun-log-echo", daemon=True)
        self.children = children
        self.out = out
        self.offsets = {c.name: _size(c.log_path) for c in children}
        self.width = max(len(c.name) for c in children)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.2):
            self.drain()
        self.drain()

    def drain(self) -> None:
        for c in self.children:
            try:
                with open(c.log_path, "rb") as f:
                    f.seek(self.offsets[c.name])
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only; the rest waits for its newline
            if not end:
                continue
            self.offsets[c.name] += end
            for line in data[:end].decode(errors="replace").splitlines():
                self.out.write(f"{c.name:<{self.width}} | {line}\n")
            self.out.flush()


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


class Supervisor:
    def __init__(
        self,
        specs: list[ChildSpec],
        run_dir: Path,
        *,
        restart: bool = True,
        echo_logs: bool = True,
        startup_timeout_s: float = 900,
        stop_grace_s: float = 15,
        say: Callable[[str], None] | None = None,
    ):
        self.run_dir = run_dir
        # Marks every process of the deployment, grandchildren included, for whoever must find them.
        specs = [replace(s, env={**s.env, "PDRUN_RUN_DIR": str(run_dir)}) for s in specs]
        self.children = [Child(s, run_dir / "logs" / f"{s.name}.log") for s in specs]
        self.restart = restart
        self.echo_logs = echo_logs
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.say = say or (lambda msg: print(f"[pdrun] {msg}", flush=True))
        self.stop_requested = threading.Event()
        self.ready = False  # started, healthy and warmed up: said once, in state.json
        self._signals = 0

    # ---- the whole run ----
    def run(self, ready_message: str = "", warm_up: Callable[[], object] | None = None) -> int:
        """Start everything, keep it up until SIGINT/SIGTERM, stop it all. 0 on a requested stop.
        `warm_up` runs once everything is healthy, before the deployment is said to be ready."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._install_signal_handlers()
        echo = LogEcho(self.children, sys.stdout) if self.echo_logs else None
        if echo:
            echo.start()
        code = 0
        try:
            for c in self.children:
                c.start()
            self._write_state()
            self.say(f"starting {len(self.children)} processes; logs in {self.run_dir / 'logs'}")
            if not self._start_up():
                code = 1
            elif self._warmed(warm_up):
                self.ready = True
                self._write_state()  # before it is said: whoever reads the line finds state.json agreeing
                self.say(ready_message or "ready")
                while not self.stop_requested.wait(0.5):
                    self.tick()
        finally:
            self.say("stopping")
            self.stop_all()
            if echo:
                echo.halt.set()
                echo.join(timeout=2)
            self._write_state()
            self.say("stopped")
        return code

    def _warmed(self, warm_up: Callable[[], object] | None) -> bool:
        """`warm_up` done (in a thread: a stop asked for meanwhile is not kept waiting); False if a
        stop was asked for first."""
        if warm_up is not None:
            worker = threading.Thread(target=warm_up, name="pdrun-warm-up", daemon=True)
            worker.start()
            while worker.is_alive() and not self.stop_requested.wait(0.2):
                pass
        return not self.stop_requested.is_set()

    def _start_up(self) -> bool:
        t0 = time.monotonic()
        last_progress = t0
        while not self.stop_requested.wait(0.5):
            for c in self.children:
                code = c.exit_code()
                if code is not None:
                    self.say(f"{c.name} exited with code {code} while starting; its last lines:\n{c.tail()}")
                    return False
                if c.state == "starting" and c.probe():
                    c.state, c.ever_healthy, c.healthy_since = "healthy", True, time.monotonic()
                    self.say(f"{c.name} healthy after {time.monotonic() - t0:.0f}s")
                    self._write_state()
            waiting = [c for c in self.children if c.state != "healthy"]
            if not waiting:
                return True
            now = time.monotonic()
            if now - t0 > self.startup_timeout_s:
                names = ", ".join(c.name for c in waiting)
                self.say(f"not healthy after {self.startup_timeout_s:.0f}s: {names}; last lines of {waiting[0].name}:")
                self.say(waiting[0].tail())
                return False
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                done = len(self.children) - len(waiting)
                names = ", ".join(c.name for c in waiting)
                self.say(f"{done}/{len(self.children)} healthy after {now - t0:.0f}s; waiting for {names}")
        return False

    # ---- steady state ----
    def tick(self) -> None:
        """One round of watching: crashes are restarted with backoff, health changes are reported."""
        now = time.monotonic()
        changed = False
        for c in self.children:
            if c.state == "down":
                if c.restart_at is not None and now >= c.restart_at:
                    self.say(f"restarting {c.name} (start #{c.starts + 1})")
                    c.start()
                    changed = True
                continue
            code = c.exit_code()
            if code is not None:
                c.reap()
                if c.healthy_since is not None and now - c.healthy_since >= STABLE_AFTER_S:
                    c.crashes = 0
                delay = BACKOFF_S[min(c.crashes, len(BACKOFF_S) - 1)]
                c.crashes += 1
                c.state = "down"
                c.restart_at = now + delay if self.restart else None
                plan = f"restarting in {delay}s" if self.restart else "not restarting (restart is off)"
                self.say(f"{c.name} exited with code {code}; {plan}")
                changed = True
                continue
            ok = c.probe()
            if ok and c.state != "healthy":
                self.say(f"{c.name} healthy" + (f" after {now - c.started_at:.0f}s" if c.state == "starting" else ""))
                c.state, c.ever_healthy, c.healthy_since = "healthy", True, now
                changed = True
            elif not ok and c.state == "healthy":
                self.say(f"{c.name} stopped answering /health")
                c.state = "unhealthy"
                changed = True
        if changed:
            self._write_state()

    # ---- stopping ----
    def stop_all(self) -> None:
        """Tier by tier: SIGTERM each group, SIGKILL what is left after the grace period, wait for all."""
        for tier in sorted({c.spec.tier for c in self.children}):
            group = [c for c in self.children if c.spec.tier == tier and c.proc is not None]
            for c in group:
                c.signal(signal.SIGTERM)
            deadline = time.monotonic() + (0.0 if self._signals > 1 else self.stop_grace_s)
            for c in group:
                assert c.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                if not wait_group_gone(c.proc.pid, max(0.0, deadline - time.monotonic())):
                    self.say(f"{c.name} did not stop within {self.stop_grace_s:.0f}s; killing it")
                c.reap()
                c.state = "stopped"

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: object) -> None:
            self._signals += 1
            if self._signals == 1:
                self.say(f"{signal.Signals(signum).name}: stopping everything (again to kill at once)")
            self.stop_requested.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "ready": self.ready, "children": {c.name: c.describe() for c in self.children}}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.run_dir / "state.json")
