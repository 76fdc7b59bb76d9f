"""The supervisor with real child processes: ready when healthy, a crash restarted with backoff,
a start-up failure reported with the child's log, and an ordered stop that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pdrun.launch.supervisor import ChildSpec, Supervisor, group_members

# A child that answers /health, starts a grandchild in its own process group (as vLLM starts its
# engine) and, if asked to, ignores SIGTERM.
CHILD = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys
    port, stubborn = int(sys.argv[1]), sys.argv[2] == "stubborn"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    print("child up on", port, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(name: str, tier: int = 1, how: str = "normal", code: str = CHILD) -> ChildSpec:
    port = free_port()
    cmd = [sys.executable, "-c", code, str(port), how]
    return ChildSpec(name, cmd, dict(os.environ), f"http://127.0.0.1:{port}/health", tier=tier)


def run_in_thread(sup: Supervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
    t.start()
    return t, result


def wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_crash_is_restarted_and_stop_leaves_no_process(tmp_path: Path):
    said: list[str] = []
    sup = Supervisor(
        [spec("front", tier=0), spec("worker"), spec("stubborn", how="stubborn")],
        tmp_path,
        echo_logs=False,
        stop_grace_s=2,
        say=said.append,
    )
    t, result = run_in_thread(sup)
    wait_for(lambda: "ready" in said)
    worker = sup.children[1]
    first = worker.proc.pid
    groups = [c.proc.pid for c in sup.children]
    assert all(len(group_members(g)) == 2 for g in groups)  # each child and its grandchild

    os.kill(first, signal.SIGKILL)  # the leader only: its grandchild must not outlive it
    wait_for(lambda: worker.state == "healthy" and worker.proc.pid != first)
    assert not group_members(first)
    assert any("worker exited with code -9; restarting in 1s" in m for m in said)
    assert worker.starts == 2 and worker.log_path.read_text().count("----- pdrun: start #") == 2

    sup.stop_requested.set()
    t.join(timeout=30)
    assert result == [0]
    assert not any(group_members(g) for g in [*groups, worker.proc.pid])
    assert any("stubborn did not stop within 2s; killing it" in m for m in said)
    assert said[-1] == "stopped"


def test_a_child_failing_at_start_up_fails_the_launch_with_its_log(tmp_path: Path):
    said: list[str] = []
    bad = spec("broken", code="import sys; print('no such model: llama-9'); sys.exit(3)")
    sup = Supervisor([spec("ok"), bad], tmp_path, echo_logs=False, say=said.append)
    t, result = run_in_thread(sup)
    t.join(timeout=30)
    assert result == [1]
    failure = next(m for m in said if "broken exited with code 3 while starting" in m)
    assert "no such model: llama-9" in failure
    assert not group_members(sup.children[0].groups[0])


def test_backoff_grows_with_consecutive_crashes(tmp_path: Path):
    said: list[str] = []
    sup = Supervisor([spec("flaky")], tmp_path, echo_logs=False, say=said.append)
    t, result = run_in_thread(sup)
    wait_for(lambda: "ready" in said)
    for _ in range(3):
        child = sup.children[0]
        pid = child.proc.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda child=child, pid=pid: child.state == "healthy" and child.proc.pid != pid)
    delays = [m.split("restarting in ")[1] for m in said if "restarting in" in m]
    assert delays == ["1s", "2s", "4s"]
    sup.stop_requested.set()
    t.join(timeout=30)
    assert result == [0]


def test_logs_are_echoed_with_the_childs_name(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    said: list[str] = []
    sup = Supervisor([spec("alpha"), spec("beta")], tmp_path, say=said.append)
    t, result = run_in_thread(sup)
    wait_for(lambda: "ready" in said)
    time.sleep(0.5)
    sup.stop_requested.set()
    t.join(timeout=30)
    assert result == [0]
    out = capfd.readouterr().out
    assert "alpha | child up on" in out and "beta  | child up on" in out


def test_ready_is_said_and_written_only_after_the_warm_up(tmp_path: Path):
    said: list[str] = []
    release = threading.Event()

    def warm_up() -> None:
        said.append("warming")
        release.wait(30)  # the deployment's first hand-offs, however long they take

    sup = Supervisor([spec("one")], tmp_path, echo_logs=False, say=said.append)
    t = threading.Thread(target=lambda: sup.run(warm_up=warm_up), daemon=True)
    t.start()
    wait_for(lambda: "warming" in said)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["children"]["one"]["state"] == "healthy" and state["ready"] is False
    assert "ready" not in said
    release.set()
    wait_for(lambda: "ready" in said)
    assert json.loads((tmp_path / "state.json").read_text())["ready"] is True
    sup.stop_requested.set()
    t.join(timeout=30)


def test_a_stop_asked_for_during_the_warm_up_is_not_kept_waiting(tmp_path: Path):
    said: list[str] = []
    sup = Supervisor([spec("one")], tmp_path, echo_logs=False, stop_grace_s=2, say=said.append)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(sup.run(warm_up=lambda: time.sleep(600))), daemon=True)
    runner.start()
    wait_for(lambda: sup.children[0].state == "healthy")
    sup.stop_requested.set()
    runner.join(timeout=30)
    assert result == [0] and "ready" not in said and said[-1] == "stopped"
    assert not group_members(sup.children[0].groups[0])
