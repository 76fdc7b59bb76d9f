"""`pdrun bench --kill-decoder`: one decoder of a pdrun deployment killed during a workload, and
watched until it is back in the proxy's rotation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pdrun.launch import systems as sysmod

REJOIN_POLL_S = 0.5


class DecoderKill:
    """One decoder of a pdrun deployment killed `after_s` into a workload, by a thread of its own:
    its vLLM API server, with SIGKILL, as `kill -9 <pid>` would (its supervisor reaps the engine
    and restarts it). Then watched until it is back: started again, healthy, and in the proxy's
    rotation. Used as `with kill: <the workload>`, then `kill.figures()`."""

    def __init__(
        self, s: sysmod.PdrunSystem, workload: str, after_s: float, rejoin_timeout_s: float, say: Callable[[str], None]
    ):
        self.system, self.workload, self.say = s, workload, say
        self.after_s, self.rejoin_timeout_s = after_s, rejoin_timeout_s
        self.decoder = s.last_decoder
        try:
            url = sysmod.child_state(s.state_path, self.decoder)["url"]
        except (OSError, ValueError, KeyError) as e:
            raise sysmod.SystemFailure(f"{self.decoder} not found in {s.state_path}: {type(e).__name__}: {e}") from e
        self.survivors = [u for u in s.instance_urls if u != url]  # the instances it leaves running
        self.started_at = self.ended_at = 0.0
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.error: str | None = None
        self._lock = threading.Lock()  # the kill and the workload's end: one of them first
        self._over = threading.Event()  # the workload ended
        self._stop = threading.Event()  # no more watching
        self._thread = threading.Thread(target=self._kill_then_watch, name=f"kill-{self.decoder}", daemon=True)

    @property
    def killed(self) -> bool:
        return self.killed_at is not None

    def __enter__(self) -> DecoderKill:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, failed: type[BaseException] | None, *_: object) -> None:
        with self._lock:
            self._over.set()
            self.ended_at = time.monotonic()
        if failed is not None:  # the system failed: nothing to wait for
            self._stop.set()
            self._thread.join()

    def _kill_then_watch(self) -> None:
        if self._over.wait(self.after_s):
            return
        with self._lock:
            if self._over.is_set():
                return  # the workload ended as the time came
            try:
                starts = sysmod.kill_instance(self.system.state_path, self.decoder)
            except (OSError, ValueError, KeyError, sysmod.SystemFailure) as e:
                self.error = f"{self.decoder} could not be killed: {type(e).__name__}: {e}"
                return
            self.killed_at = time.monotonic()
        while not self._stop.wait(REJOIN_POLL_S):
            if sysmod.rejoined(self.system.state_path, self.system.url, self.decoder, starts):
                self.back_at = time.monotonic()
                return

    def figures(self) -> dict[str, float]:
        """`decoder_killed` (1, or 0 where the workload ended before the kill) and, the decoder
        waited for up to `rejoin_timeout_s`, `decoder_rejoined_s`: from the kill until it was
        back. SystemFailure where it could not be killed or did not come back."""
        if self.error is not None:
            raise sysmod.SystemFailure(self.error)
        name, at = self.system.name, f"{self.after_s:g}s"
        if self.killed_at is None:
            took = self.ended_at - self.started_at
            self.say(f"  {name}: {self.decoder} not killed: {self.workload} ended after {took:.0f}s, before {at}")
            return {"decoder_killed": 0.0}
        self._thread.join(self.rejoin_timeout_s)
        self._stop.set()
        self._thread.join()
        if self.back_at is None:
            raise sysmod.SystemFailure(f"{self.decoder} did not rejoin within {self.rejoin_timeout_s:.0f} s")
        back = self.back_at - self.killed_at
        self.say(f"  {name}: {self.decoder} killed {at} into {self.workload}; back in rotation {back:.0f}s later")
        return {"decoder_killed": 1.0, "decoder_rejoined_s": back}
