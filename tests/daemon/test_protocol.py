"""The socket wire format: frames, the envelope, typed requests that name the field that is wrong,
and token packing."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import fuzz_examples
from tiercache.daemon.protocol import (
    MAX_FRAME,
    Hello,
    Lookup,
    ProtocolError,
    Register,
    Reserve,
    decode,
    decode_envelope,
    decode_request,
    encode,
    encode_request,
    pack_tokens,
    read_frame,
    unpack_tokens,
)


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_a_frame_is_a_big_endian_length_then_msgpack() -> None:
    frame = encode({"id": 1, "op": "bye"})
    n = int.from_bytes(frame[:4], "big")
    assert n == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1, "op": "bye"}
    assert decode(frame[4:]) == {"id": 1, "op": "bye"}


def test_a_message_bigger_than_a_frame_is_refused_when_encoded() -> None:
    with pytest.raises(ProtocolError) as e:
        encode({"blob": b"x" * (MAX_FRAME + 1)})
    assert e.value.code == "frame_too_large"


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.binary(max_size=200))
def test_the_frame_decoder_raises_only_protocol_errors(body: bytes) -> None:
    try:
        msg = decode(body)
    except ProtocolError as e:
        assert e.code == "bad_frame"
    else:
        assert isinstance(msg, dict)


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb(3)])
def test_a_body_that_is_not_a_msgpack_map_is_a_bad_frame(body: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(body)
    assert e.value.code == "bad_frame"


async def test_read_frame_returns_frames_in_order_then_none_at_a_clean_end() -> None:
    reader = reader_of(encode({"a": 1}) + encode({"b": 2}))
    first, second = await read_frame(reader), await read_frame(reader)
    assert first is not None and decode(first) == {"a": 1}
    assert second is not None and decode(second) == {"b": 2}
    assert await read_frame(reader) is None


@pytest.mark.parametrize("cut", [2, 4 + 3])
async def test_a_stream_that_ends_inside_a_frame_is_truncated(cut: int) -> None:
    frame = encode({"op": "hello", "args": {"version": 1}})
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader_of(frame[:cut]))
    assert e.value.code == "truncated"


async def test_a_header_announcing_more_than_a_frame_is_refused_before_reading_it() -> None:
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader_of((MAX_FRAME + 1).to_bytes(4, "big")))
    assert e.value.code == "frame_too_large"


def test_the_envelope_needs_a_string_op_and_map_args() -> None:
    assert decode_envelope({"id": 7, "op": "bye"}) == (7, "bye", {})
    with pytest.raises(ProtocolError, match="'op' must be a string"):
        decode_envelope({"id": 7, "op": 3})
    with pytest.raises(ProtocolError, match="'args' must be a map"):
        decode_envelope({"id": 7, "op": "bye", "args": [1]})


def test_a_request_round_trips_through_its_wire_form() -> None:
    req = Reserve(ns="n1", keys=b"k" * 32, first_block=2, count=3, session="s")
    msg = decode(encode_request(9, req)[4:])
    assert msg["id"] == 9 and msg["op"] == "reserve"
    assert decode_request(msg["op"], msg["args"]) == req


def test_an_unknown_op_is_named_and_the_known_ones_listed() -> None:
    with pytest.raises(ProtocolError) as e:
        decode_request("fly", {})
    assert e.value.code == "unknown_op"
    assert "'fly'" in e.value.message and "hello" in e.value.message


def test_a_missing_required_field_is_a_bad_request_with_its_hint() -> None:
    with pytest.raises(ProtocolError) as e:
        decode_request("register", {"spec": {}})
    assert e.value.code == "bad_request"
    assert "register needs 'model'" in e.value.message


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"ns": "n", "first_block": -1}, "'first_block' must be a non-negative integer"),
        ({"ns": "n", "first_block": True}, "'first_block' must be a non-negative integer"),
        ({"ns": "n", "first_block": "2"}, "'first_block' must be a non-negative integer"),
        ({"ns": 5}, "'ns' must name a namespace"),
        ({"ns": "n", "keys": "text"}, "'keys' must be the concatenated 16-byte block keys"),
    ],
)
def test_a_field_of_the_wrong_type_is_a_bad_request_naming_it(
    args: dict[str, object], says: str
) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_request("lookup", args)
    assert e.value.code == "bad_request"
    assert says in e.value.message


def test_unknown_fields_are_ignored_and_absent_optional_fields_take_their_defaults() -> None:
    req = decode_request("lookup", {"ns": "n", "keys": b"", "from_a_newer_client": 1})
    assert req == Lookup(ns="n", keys=b"", first_block=0)
    assert decode_request("hello", {"version": 1}) == Hello(version=1, client="")
    reg = decode_request("register", {"model": "m", "spec": {"a": 1}})
    assert isinstance(reg, Register) and reg.salt == "" and reg.store_dtype == "exact"


def test_tokens_pack_as_little_endian_uint32_and_unpack_back() -> None:
    raw = pack_tokens([0, 1, 2**32 - 1])
    assert raw == np.array([0, 1, 2**32 - 1], dtype="<u4").tobytes()
    assert unpack_tokens(raw).tolist() == [0, 1, 2**32 - 1]
    assert pack_tokens([]) == b""


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_token_ids_outside_uint32_cannot_be_packed(bad: list[int]) -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\^32\)"):
        pack_tokens(bad)


@pytest.mark.parametrize("raw", [b"abc", "text", 5])
def test_tokens_that_are_not_whole_uint32s_are_a_bad_request(raw: object) -> None:
    with pytest.raises(ProtocolError) as e:
        unpack_tokens(raw)
    assert e.value.code == "bad_request"


def test_a_chain_request_by_tokens_has_no_key_chain() -> None:
    req = decode_request("lookup", {"ns": "n", "tokens": pack_tokens([1, 2, 3])})
    assert isinstance(req, Lookup)
    assert req.sequence().tolist() == [1, 2, 3]  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="'keys' must be"):
        req.chain()
