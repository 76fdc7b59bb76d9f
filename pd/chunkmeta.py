"""What travels with a chunk's bytes in a frame's `meta` (a hand-off, the cache tier): typed and
validated where it is received, so that bytes are scattered only into a cache of their layout."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from pdrun.transfer import ProtocolError


class ChunkMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole chunk: the layout its bytes are in (`PagedKV.describe`) and the blocks it holds."""

    layout: str
    blocks: int

    def encode(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class LayerMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One layer of one or more chunks sent joined (a layer-wise hand-off): the layout, each
    chunk's blocks in order, and the layer."""

    layout: str
    blocks: list[int]
    layer: int

    def encode(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class RunMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A frame of one or more adjacent chunks of a hand-off: the layout and each chunk's blocks in order."""

    layout: str
    blocks: list[int]

    def encode(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


Meta = TypeVar("Meta", ChunkMeta, LayerMeta, RunMeta)


def received(meta: Any, kind: type[Meta]) -> Meta:
    """`meta` as it arrived, as `kind`; ProtocolError naming what is wrong with it."""
    try:
        return msgspec.convert(meta, kind)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid chunk metadata {meta!r:.200}: {e}") from None


def frame_chunks(meta: Any) -> RunMeta:
    """A frame of whole chunks as it arrived, one (ChunkMeta) or several (RunMeta), as a RunMeta."""
    if isinstance(meta, dict) and isinstance(meta.get("blocks"), list):
        return received(meta, RunMeta)
    one = received(meta, ChunkMeta)
    return RunMeta(one.layout, [one.blocks])
