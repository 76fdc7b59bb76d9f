"""Logging for pdrun's code inside processes it does not own (vLLM's engine and workers).

vLLM configures only its own loggers; without this, the connector's warnings (a failed hand-off
and why) would vanish. Level from PDRUN_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import logging
import os
import sys


class _Formatter(logging.Formatter):
    """`[pdrun pd.connector pid=...]`: the logger's name without the package's own."""

    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.removeprefix("pdrun.")
        return super().format(record)


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("PDRUN_LOG_LEVEL", "INFO")).upper()
    logger = logging.getLogger("pdrun")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _Formatter("%(levelname)s %(asctime)s [pdrun %(short)s pid=%(process)d] %(message)s", "%m-%d %H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
