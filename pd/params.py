"""The hand-off a prefiller returns in `kv_transfer_params`, and what the proxy sends each side.

    to the prefiller:  {"do_remote_decode": true}
    from it:           {"do_remote_prefill": true, "do_remote_decode": false,
                        "pdrun": {"endpoints": [...], "transfer": ..., "num_tokens": ...,
                                  "keys": [...], "fingerprint": ..., "chunk_size": ...}}
    to the decoder:    what the prefiller returned, unchanged.

Both sides also report timing under "pdrun_timing", which the proxy records: the prefiller
{"queued_s", "prefill_s"} (arrival to first scheduled, first scheduled to finished), the decoder
{"queued_s", "load_s"} (arrival to first scheduled, the hand-off's load), the latter in its
non-streamed answers only (vLLM returns kv_transfer_params there only).

The decoder re-derives the chunk keys from its own prompt tokens and loads only the prefix whose
keys agree: a prompt that differs, or a prefiller with another model or KV layout, is caught here
and the decoder prefills locally.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

TIMING = "pdrun_timing"

MAX_HANDOFF_KEYS = 1 << 16  # the chunks of one hand-off
MAX_FRAME_CHUNKS = 16  # adjacent chunks of a hand-off a decoder may ask for joined in one frame
HexKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


class HandOff(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[str] = Field(min_length=1, max_length=64)  # one per tensor-parallel rank
    transfer: str = Field(min_length=1, max_length=256)
    num_tokens: int = Field(ge=0)  # the prompt's tokens whose KV is staged (all of them)
    keys: list[HexKey] = Field(max_length=MAX_HANDOFF_KEYS)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{32}$")
    chunk_size: int = Field(gt=0)

    def key_bytes(self) -> list[bytes]:
        return [bytes.fromhex(k) for k in self.keys]


def wants_handoff(params: dict[str, Any] | None) -> bool:
    """The request is a prefill whose KV a decoder will pull."""
    return bool(params) and params.get("do_remote_decode") is True  # type: ignore[union-attr]


def handoff_of(params: dict[str, Any] | None) -> HandOff | None:
    """The hand-off in a decoder request's params; None if there is none. Raises
    pydantic.ValidationError when one is there but malformed."""
    if not params or not params.get("do_remote_prefill") or "pdrun" not in params:
        return None
    return HandOff.model_validate(params["pdrun"])


def handoff_params(handoff: HandOff) -> dict[str, Any]:
    return {"do_remote_prefill": True, "do_remote_decode": False, "pdrun": handoff.model_dump()}
