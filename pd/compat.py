"""The vLLM versions PDConnector is built and tested against; anything else fails loudly."""

from __future__ import annotations

from packaging.version import Version

SUPPORTED = (Version("0.26"), Version("0.34"))  # [low, high)


def check_vllm_version(version: str | None = None) -> str:
    if version is None:
        import vllm

        version = vllm.__version__
    v = Version(Version(version).base_version)
    low, high = SUPPORTED
    if not low <= v < high:
        raise RuntimeError(
            f"pdrun's PDConnector supports vLLM >= {low}, < {high}; this is vLLM {version}. "
            f"Install a supported vLLM (pip install 'pdrun[gpu]' or 'pdrun[cpu]')."
        )
    return version


# A hand-off loaded inside the forward pass (a `layerwise` decoder) that fails is recomputed by vLLM's
# recovery of synchronous loads. Below 0.32 that recovery is not trusted: on 0.26 it gives the
# request's output shifted by one token (on GPUs, bf16 and batch-invariant alike; whole-chunk loads
# are right), so a decoder loads whole chunks there. 0.32 recovers right on vLLM's CPU backend; on
# GPUs it is not measured yet (docs/benchmarks.md).
SYNC_LOAD_RECOVERY = Version("0.32")


def recovers_failed_sync_loads(version: str | None = None) -> bool:
    if version is None:
        import vllm

        version = vllm.__version__
    return Version(Version(version).base_version) >= SYNC_LOAD_RECOVERY
