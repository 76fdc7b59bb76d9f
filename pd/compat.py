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
