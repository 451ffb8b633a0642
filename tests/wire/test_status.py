"""grpc-message encoding as the gRPC HTTP/2 protocol defines it, and lenient decoding."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.wire.status import decode_grpc_message, encode_grpc_message


@pytest.mark.parametrize(
    "message",
    [
        "job not found: 999",
        "job is not running: 1 (current status: FAILED)",
        "role viewer is not allowed to perform operation create_job",
        "command not found in PATH: invalid-command",
        "request message too large: 5000619 bytes (limit 4194304)",
    ],
)
def test_printable_ascii_goes_as_it_is(message: str) -> None:
    assert encode_grpc_message(message) == message


def test_only_bytes_outside_printable_ascii_and_percent_are_escaped() -> None:
    assert encode_grpc_message("h\u00e9llo") == "h%C3%A9llo"
    assert encode_grpc_message("50%off") == "50%25off"
    assert encode_grpc_message("a\nb\tc\x7f") == "a%0Ab%09c%7F"
    assert encode_grpc_message("~ !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}") == (
        "~ !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}"
    )


def test_what_grpc_js_decodes_with_decode_uri_is_the_message() -> None:
    # decodeURI leaves escapes of reserved characters (; / ? : @ & = + $ , #) undecoded; the
    # encoder must never produce one.
    reserved = ";/?:@&=+$,#"
    encoded = encode_grpc_message(f"{reserved} h\u00e9llo 100%")
    for char in reserved:
        assert urllib.parse.quote(char, safe="") not in encoded


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100%", "100%"),  # a lone % at the end
        ("%4", "%4"),  # an escape cut short
        ("%zz and %4g", "%zz and %4g"),  # not hex
        ("%FF", "\ufffd"),  # not UTF-8
        ("%C3%A9%", "\u00e9%"),
        ("job not found: 999", "job not found: 999"),
        ("job is not running%3A 1", "job is not running: 1"),  # over-escaped peers still decode
    ],
)
def test_decoding_is_lenient_and_never_raises(value: str, message: str) -> None:
    assert decode_grpc_message(value) == message
    assert decode_grpc_message(value.encode()) == message


@given(st.text())
def test_any_message_round_trips(message: str) -> None:
    encoded = encode_grpc_message(message)
    assert all(0x20 <= ord(char) <= 0x7E for char in encoded)
    expected = message.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert decode_grpc_message(encoded) == expected


@given(st.binary())
def test_decoding_arbitrary_bytes_never_raises(value: bytes) -> None:
    assert isinstance(decode_grpc_message(value), str)
