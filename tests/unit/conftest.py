"""UCX in the tests: loopback only, so nothing listens beyond 127.0.0.1."""

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
