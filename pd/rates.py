"""What an instance measures as it runs to decide what to load from the cache tier's disk."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Rates:
    """What this instance measures as it runs, to load from disk only what pays: its prefill rate
    (tokens of the steps that computed at least a chunk, over the time to the next step) and its
    disk loads' rate (tokens over seconds, as its workers report them). Given a `path` (beside the
    tier's disk, one file per model and KV layout), they are kept there and read back at start, so
    that a restarted instance decides at its first request instead of computing while it measures."""

    ALPHA = 0.2  # weight of the newest sample
    PROBE_CHUNKS = 2  # read from disk while its rate is not known yet
    SAVE_EVERY_S = 10.0  # written when first measured, then at most this often (and at shutdown, if vLLM calls it)

    def __init__(self, chunk_size: int, path: Path | None = None):
        self.chunk_size = chunk_size
        self.prefill: float | None = None  # tokens/s
        self.disk: float | None = None
        self.path = path
        self._last: tuple[float, int] | None = None
        self._prefilled = False  # this run has measured a prefill step
        self._saved: tuple[float | None, float | None] = (None, None)
        self._saved_at = -math.inf  # the first rate measured is kept at once
        if path is not None:
            self._load(path)

    @classmethod
    def _mix(cls, old: float | None, sample: float) -> float:
        return sample if old is None else (1 - cls.ALPHA) * old + cls.ALPHA * sample

    def step(self, tokens: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            then, computed = self._last
            if computed >= self.chunk_size and 0 < now - then < 2.0:  # not an idle gap
                self.prefill = self._mix(self.prefill, computed / (now - then))
                self._prefilled = True
                self._save_now_and_then()
        self._last = (now, tokens)

    def disk_read(self, stats: dict[str, Any]) -> None:
        tokens, seconds = stats.get("cache_disk_loaded_tokens", 0), stats.get("cache_disk_load_seconds", 0.0)
        if tokens and seconds > 0:
            self.disk = self._mix(self.disk, tokens / seconds)
            self._save_now_and_then()

    def disk_chunks(self, on_disk: int) -> int:
        """How many of `on_disk` chunks to read: all where that pays, none where it does not (both
        rates known, measured or kept); while the disk is not measured, a few once this run has
        prefilled, none before (the first requests after a restart are computed, not spent
        measuring the disk)."""
        pays = self.disk_pays()
        if pays is not None:
            return on_disk if pays else 0
        return min(on_disk, self.PROBE_CHUNKS) if self._prefilled else 0

    def disk_pays(self) -> bool | None:
        """Whether reading from disk beats computing; None until both are measured."""
        if self.disk is None or self.prefill is None:
            return None
        return self.disk > self.prefill

    # -- kept across restarts --
    def _load(self, path: Path) -> None:
        """The rates a previous run kept; a file missing or not understood is ignored."""
        try:
            kept = json.loads(path.read_text())
            prefill, disk = kept.get("prefill_tokens_per_s"), kept.get("disk_tokens_per_s")
        except (OSError, ValueError, AttributeError) as e:
            if not isinstance(e, FileNotFoundError):
                log.info("cache tier: ignoring the rates kept in %s: %s", path, e)
            return
        self.prefill, self.disk = _rate(prefill), _rate(disk)
        self._saved = (self.prefill, self.disk)
        log.info("cache tier: rates kept from a previous run: prefill %s, disk reads %s tokens/s", prefill, disk)

    def _save_now_and_then(self) -> None:
        if self.path is not None and time.monotonic() - self._saved_at >= self.SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        """Keep the rates in `path` (written whole: a reader sees the old file or the new)."""
        if self.path is None or (self.prefill, self.disk) == self._saved:
            return
        self._saved_at, self._saved = time.monotonic(), (self.prefill, self.disk)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"prefill_tokens_per_s": self.prefill, "disk_tokens_per_s": self.disk}))
            os.replace(tmp, self.path)
        except OSError as e:  # a directory this instance may not write: measured again next time
            log.debug("cache tier: rates not kept in %s: %s", self.path, e)
            with contextlib.suppress(OSError):
                tmp.unlink()


def _rate(value: Any) -> float | None:
    """A kept rate, if it is one (a positive, finite number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None
