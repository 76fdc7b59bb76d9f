"""A prefiller copying the chunks a step finishes out of its KV cache layer by layer (`layerwise`).

vLLM calls the connector's `save_kv_layer` right after each attention layer has run. With
`layerwise` on, that layer's blocks of every chunk the step finishes are copied into the chunks'
staging buffers there and then (one launch per layer with the Triton copies), so the copies
overlap the rest of the forward pass instead of following it; host-staged, each layer also goes
out to host memory on a side stream as soon as it is copied. The chunks are served once the step
is done (`wait_for_save`), where any layer no hook copied is copied too: vLLM skips the hooks
where it has no attention metadata (profiling runs), and then the step falls back to whole-chunk
copies. Decoders are unaffected: they load whole chunks before their request is scheduled.
"""

from __future__ import annotations

import torch

from pd.codec import PagedKV, Ready
from pd.plan import ChunkSave


class LayerwiseSave:
    """One step's chunks (each with the staging buffer it goes into), copied out layer by layer."""

    def __init__(self, paged: PagedKV, chunks: list[tuple[ChunkSave, torch.Tensor]]):
        self.paged = paged
        self.chunks = chunks
        self.copied = [False] * len(paged.layers)
        self.hooked = 0  # layers copied as vLLM computed them (the rest in `finish`)
        buffers = [buf for _, buf in chunks]
        # Host-staged: a layer lands beside the cache first, then goes out on the side stream.
        self._host = any(b.device != paged.device for b in buffers) and paged.device.type == "cuda"
        self._outs = [torch.empty_like(b, device=paged.device) for b in buffers] if self._host else buffers
        self._ids = [s.block_ids for s, _ in chunks]
        self._table = paged.gather_table(self._ids, self._outs) if chunks else None  # the same for every layer

    def layer(self, index: int) -> None:
        """Layer `index` was just computed: copy its blocks of every chunk out (queued on the
        current stream, behind the layer's attention)."""
        if not self.copied[index]:
            self._copy(range(index, index + 1))
            self.hooked += 1

    def finish(self) -> Ready | None:
        """The forward pass is queued: copy the layers no hook copied, and return what to wait for
        before the chunks are read."""
        missing = [i for i, done in enumerate(self.copied) if not done]
        while missing:  # in runs of consecutive layers: one launch (and one copy out per chunk) each
            n = next((k for k in range(1, len(missing)) if missing[k] != missing[0] + k), len(missing))
            self._copy(range(missing[0], missing[0] + n))
            missing = missing[n:]
        if self.paged.device.type != "cuda":
            return None
        if self._host:
            copier = self.paged.copier()
            for out in self._outs:
                out.record_stream(copier)  # not handed out again before its copy out is done
            with torch.cuda.stream(copier):
                return self.paged.queued()
        return self.paged.queued()

    def _copy(self, layers: range) -> None:
        for i in layers:
            self.copied[i] = True
        if not self.chunks:
            return
        self.paged.gather_layers(self._ids, self._outs, layers, self._table)
        if self._host:
            copier = self.paged.copier()
            copier.wait_stream(torch.cuda.current_stream(self.paged.device))
            with torch.cuda.stream(copier):
                for out, (_, buf) in zip(self._outs, self.chunks, strict=True):
                    per_layer = buf.numel() // len(self.copied)  # a chunk is [layers, blocks, ...]
                    part = slice(layers.start * per_layer, layers.stop * per_layer)
                    buf[part].copy_(out[part], non_blocking=True)
