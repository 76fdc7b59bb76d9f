"""Logging for pdrun's code inside processes it does not own (vLLM's engine and workers).

vLLM configures only its own loggers; without this, the connector's warnings (a failed hand-off
and why) would vanish. Level from PDRUN_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGES = ("pd", "transfer", "storage", "launch")


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("PDRUN_LOG_LEVEL", "INFO")).upper()
    fmt = logging.Formatter("%(levelname)s %(asctime)s [pdrun %(name)s pid=%(process)d] %(message)s", "%m-%d %H:%M:%S")
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(fmt)
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)
