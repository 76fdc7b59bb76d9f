"""UCX in the tests: loopback only, so nothing listens beyond 127.0.0.1. pdrun's log records
reach pytest's capture (caplog) whichever test imported the connector, which gives the "pdrun"
logger a handler of its own, first."""

import logging
import os
import threading
import time

import pytest
import torch

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


class LateCopy:
    """A fill that finishes after `stage` returns, as a CUDA copy queued on a stream does; waiting
    for it is `synchronize`, as for a CUDA event."""

    def __init__(self, buf: torch.Tensor, value: int, delay_s: float):
        self.thread = threading.Thread(target=lambda: (time.sleep(delay_s), buf.fill_(value)))
        self.thread.start()

    def synchronize(self) -> None:
        self.thread.join()


@pytest.fixture(autouse=True)
def pdrun_logs_to_caplog(monkeypatch):
    monkeypatch.setattr(logging.getLogger("pdrun"), "propagate", True)
