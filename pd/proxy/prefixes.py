"""Which decoder the proxy sent each prompt prefix to lately: its guess at what every decoder's own
prefix cache holds, so that a request a decoder computes or loads itself goes where the longest
part of its prompt is computed already (a conversation's next turn to the decoder that answered
the last one), rather than to any decoder, which would load the history from the cache tier or
compute it again.

A prompt is named by the chained hashes of its whole pieces (256 token ids, or 1 KiB of a text
prompt or of a chat's messages, UTF-8): prompts that share a piece share every piece before it. What a
decoder was sent is remembered for the last CAPACITY pieces over all decoders, a prompt's head
newest (its tail is worth nothing without it). A guess: a decoder may have evicted a prefix since;
the request then costs there what it would cost anywhere.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pdrun.pd.keys import chained_digests, chained_keys

PIECE_TOKENS = 256
PIECE_CHARS = 1024
CAPACITY = 1 << 16  # (piece, decoder) pairs: 16M tokens of prefixes at 256 a piece


def pieces(body: dict[str, Any]) -> list[int]:
    """The chained hashes of the whole pieces of a request's prompt; [] for batched prompts and
    anything else that names no one prompt."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if isinstance(messages, list) or isinstance(prompt, str):
        text = json.dumps(messages, sort_keys=True, ensure_ascii=False) if isinstance(messages, list) else prompt
        data = str(text).encode()
        digests = chained_digests(b"", data[: len(data) - len(data) % PIECE_CHARS], PIECE_CHARS)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        try:
            digests = chained_keys(b"", PIECE_TOKENS, prompt, full_only=True)
        except (OverflowError, TypeError):  # not token ids vLLM would take: nothing to name
            return []
    else:
        return []
    return [int.from_bytes(d[:8], "little") for d in digests]


class SentPrefixes:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._sent: OrderedDict[int, None] = OrderedDict()  # hash of (piece, decoder), oldest first

    def __len__(self) -> int:
        return len(self._sent)

    def depth(self, decoder_seed: int, prompt: Sequence[int]) -> int:
        """How many of the prompt's leading pieces the decoder was sent."""
        n = 0
        for piece in prompt:
            if piece ^ decoder_seed not in self._sent:
                break
            n += 1
        return n

    def sent(self, decoder_seed: int, prompt: Sequence[int]) -> None:
        """The decoder was sent the prompt: its pieces become the newest, the head last of all."""
        for piece in reversed(prompt):
            key = piece ^ decoder_seed
            self._sent[key] = None
            self._sent.move_to_end(key)
        while len(self._sent) > self.capacity:
            self._sent.popitem(last=False)
