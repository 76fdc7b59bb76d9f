"""Whatever arrives, pdrun answers an error and goes on: the wire format, a cache server and the
proxy's request handling fed arbitrary input (hypothesis). Each test ends by checking that what
was fuzzed still serves a well-formed request."""

from __future__ import annotations

import contextlib
import json
import socket
import struct

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdrun.pd.chunkmeta import ChunkMeta, LayerMeta, received
from pdrun.pd.proxy.body import BadRequest, decode_only_reason, parse_body
from pdrun.pd.proxy.continuation import CHAT, COMPLETIONS, inexact_reason, prefill_body
from pdrun.pd.proxy.routing import affinity_key, prompt_tokens
from pdrun.pd.proxy.shortcut import _may_fill_a_chunk
from pdrun.storage.client import CacheClient
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore
from pdrun.transfer import ProtocolError
from pdrun.transfer.wire import MAGIC, PREFIX, VERSION, Header, decode_header, decode_prefix, encode_header
from tests.unit.test_tiers import CHUNK, key, payload

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def values(ints: st.SearchStrategy[int]) -> st.SearchStrategy:
    return st.recursive(
        st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=20,
    )


json_values = values(st.integers(-(2**70), 2**70))
msgpack_values = values(st.integers(-(2**63), 2**63 - 1))


@FUZZ
@given(st.binary(max_size=200))
def test_a_header_of_any_bytes_is_decoded_or_refused_as_a_protocol_error(raw):
    with contextlib.suppress(ProtocolError):
        decode_header(raw, 1 << 20)
    if len(raw) >= PREFIX.size:
        with contextlib.suppress(ProtocolError):
            decode_prefix(raw[: PREFIX.size])


@FUZZ
@given(
    st.one_of(
        st.dictionaries(st.sampled_from(["layout", "blocks", "layer", "surprise"]), msgpack_values, max_size=4),
        msgpack_values,
    ),
    st.sampled_from([ChunkMeta, LayerMeta]),
)
def test_chunk_metadata_of_any_shape_is_read_typed_or_refused_as_a_protocol_error(meta, kind):
    try:
        got = received(meta, kind)
    except ProtocolError as e:
        assert "invalid chunk metadata" in str(e)
        return
    assert isinstance(got.layout, str) and set(meta) == set(kind.__struct_fields__)
    assert got.encode() == meta  # what a sender encodes is what a receiver reads


def frames() -> st.SearchStrategy[bytes]:
    """What a peer might send: noise, a header of another version or an oversize one, a header of
    random fields (valid msgpack or not), or a frame whose payload ends early."""
    noise = st.binary(min_size=1, max_size=300)
    bad_prefix = st.builds(
        lambda v, n, rest: PREFIX.pack(MAGIC, v, n) + rest,
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=50),
    )
    fields = st.dictionaries(
        st.sampled_from(["op", "key", "nbytes", "checksum", "more", "meta", "surprise"]), msgpack_values, max_size=6
    )
    random_header = fields.map(lambda d: _framed(msgspec.msgpack.encode(d)))
    ops = st.sampled_from(["lookup", "get", "put", "stats", "local", "release", "hello", "zz"])
    truncated = st.builds(
        lambda op, meta, n, cut: encode_header(Header(op=op, nbytes=n, meta=meta)) + b"x" * min(cut, n),
        ops,
        st.dictionaries(st.sampled_from(["keys", "token", "transfer"]), msgpack_values, max_size=2),
        st.integers(0, 1 << 20),
        st.integers(0, 4096),
    )
    return st.one_of(noise, bad_prefix, random_header, truncated)


def _framed(body: bytes) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, len(body)) + body


def test_a_cache_server_fed_anything_answers_errors_and_goes_on_serving():
    store = TieredStore(MemoryTier(8 * CHUNK))
    with CacheServer("tcp://127.0.0.1:0", store, local=False, auth_token=None) as server:
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)

        @FUZZ
        @given(frames())
        def send(data: bytes) -> None:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)  # the rest never comes: the server must not wait for it
                    while sock.recv(1 << 16):
                        pass
                except TimeoutError:
                    raise AssertionError(f"the server neither answered {data[:40]!r} nor closed in 5 s") from None
                except OSError:  # it dropped the connection (a reset): allowed
                    pass

        send()
        client = CacheClient(server.address)
        assert client.put(key(1), payload(1), {"i": 1}) and client.lookup([key(1)]) == 1
        client.close()


completion_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(json_values, st.lists(st.integers(0, 50000), min_size=1, max_size=300))},
    optional={k: json_values for k in ("model", "max_tokens", "n", "best_of", "stream", "min_tokens", "seed",
                                       "temperature", "response_format", "logprobs", "echo", "cache_salt")},
)  # fmt: skip
chat_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(json_values, st.lists(st.dictionaries(st.sampled_from(["role", "content"]), json_values)))},
    optional={k: json_values for k in ("model", "max_completion_tokens", "tools", "tool_choice", "logprobs")},
)


@FUZZ
@given(st.one_of(completion_bodies.map(lambda b: (COMPLETIONS, b)), chat_bodies.map(lambda b: (CHAT, b))))
def test_a_request_the_proxy_accepts_is_routed_without_an_error_and_any_other_gets_a_400(case):
    path, sent = case
    try:
        body = parse_body(json.dumps(sent).encode(), path)
    except BadRequest as e:
        assert e.status == 400 and str(e)
        return
    decode_only_reason(body)
    inexact_reason(path, body)
    prefill_body(path, body)
    affinity_key(body)
    assert prompt_tokens(body) >= 1
    _may_fill_a_chunk(body, 256)


def test_an_unparsable_body_is_a_400():
    for raw in (b"", b"{", b"[1, 2]", b"\xff\xfe", struct.pack("<d", 1.5)):
        try:
            parse_body(raw, COMPLETIONS)
        except BadRequest as e:
            assert e.status == 400
        else:
            raise AssertionError(f"{raw!r} was accepted")
