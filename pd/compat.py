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
# recovery of synchronous loads. On 0.26 (two H200s, bf16 and batch-invariant alike) the recomputed
# request's output was plain vLLM's shifted by one token, where its whole-chunk loads were right; on
# 0.32 the CPU tests see it right (0.32 on a GPU is not measured).
SYNC_LOAD_RECOVERY = Version("0.32")


def recovers_failed_sync_loads(version: str | None = None) -> bool:
    if version is None:
        import vllm

        version = vllm.__version__
    return Version(Version(version).base_version) >= SYNC_LOAD_RECOVERY
