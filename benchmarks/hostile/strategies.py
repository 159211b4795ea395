"""Hypothesis strategies for the pieces of a hostile request: text, k, names, corrupt wire bytes.

Each strategy mixes the ordinary with the odd, so that the model also runs on hostile
text (a request refused at the door tests less than one that reaches the tokenizer).
"""

from __future__ import annotations

import operator

from hypothesis import strategies as st

from benchmarks.hostile import wire

MAX_TEXT_CHARS = 4096  # the server's default --max-text-chars: long texts straddle it

# Ordinary pieces, so that some texts are words the model knows.
WORDS = ("the ", "it is a truth universally ", "emma", " and", "of ", " ", ".", "'", "-", "don't ", "1999 ")
# Characters that normalisation, case folding or the word pattern treat specially.
TRICKY = (
    "\u200b",  # zero-width space (format character, not whitespace)
    "\u200d",  # zero-width joiner
    "\u202e",  # right-to-left override
    "\ufeff",  # byte-order mark
    "\u0301",  # combining acute accent (a "letter" in the word pattern)
    "\ufdfa",  # one code point that NFKC expands to 18 characters, four words
    "\ufb03",  # "ffi" ligature: one character, three after NFKC
    "\u0130",  # capital I with dot: lower-cases to two code points
    "\u2028\u2029\x85\r\n\t\x0b\x0c",  # line/paragraph separators and friends
    "\x00\x01\x7f",  # controls
    "\ud7ff\ue000\ufffe\uffff\U0010ffff",  # either side of the surrogates; the last code point
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # an emoji ZWJ sequence
    "\uff11\uff12\uff13",  # full-width digits (NFKC: "123" -> <num>)
    "\u216b",  # roman numeral twelve (NFKC: "xii")
    "\u2019\u201c\u201d_",  # curly quotes and the underscore the tokenizer rewrites or drops
    "\U000e0041",  # a tag character
)
# Byte sequences that are not UTF-8: a proto3 string holding one is a corrupt message.
BAD_UTF8 = (
    b"\xed\xa0\x80",  # a lone high surrogate (U+D800) as CESU-8/WTF-8 would write it
    b"\xed\xbf\xbf",  # a lone low surrogate (U+DFFF)
    b"\xed\xa0\xbd\xed\xb8\x80",  # a surrogate pair written as two code points
    b"\xc0\x80",  # over-long NUL
    b"\xe0\x80\xaf",  # over-long "/"
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # a five-byte sequence
    b"\xe2\x82",  # a sequence cut short
    b"\x80",  # a continuation byte alone
    b"\xfe\xff",  # bytes UTF-8 never uses
)
# k values at and past every boundary: 0 (default), max_k, 32 and 64 bits, negative.
EDGE_K = (-1, 0, 1, 50, 51, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 3, 2**63, 2**64 - 1, -(2**63))


def texts() -> st.SearchStrategy[str]:
    """Any text a valid message may carry: odd Unicode, controls, words, and long runs."""
    pieces = st.sampled_from(WORDS + TRICKY)
    return st.one_of(
        st.text(max_size=48),  # any code point UTF-8 can carry
        # Categories that are rarely letters: controls, format, private use, unassigned, marks, spaces.
        st.text(
            st.characters(
                categories=["Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me", "Lm", "Sk", "Nl", "No"]
            ),
            max_size=48,
        ),
        st.lists(st.one_of(pieces, st.text(max_size=3)), max_size=24).map("".join),
        # Long runs: some past --max-text-chars, some under it that normalisation multiplies.
        st.builds(operator.mul, pieces, st.integers(1, MAX_TEXT_CHARS // 2)),
    )


def short_texts() -> st.SearchStrategy[str]:
    """What a typing client sends between two replies (session turns)."""
    return st.one_of(st.sampled_from(WORDS + TRICKY), st.text(max_size=12), texts())


def small_k() -> st.SearchStrategy[int]:
    return st.integers(0, 8)


def extreme_k() -> st.SearchStrategy[int]:
    """Past max_k, past 32 bits (the field is uint32), negative (ten-byte varints), past 64 bits."""
    return st.one_of(
        st.sampled_from(EDGE_K),
        st.integers(-(2**63), 2**64 - 1),
        st.integers(2**64, 2**90),  # a varint longer than ten bytes: corrupt
    )


def names() -> st.SearchStrategy[str]:
    """Model names and session ids nobody issued: short, plausible, or overlong."""
    return st.one_of(
        st.text(max_size=32),
        st.text("0123456789abcdefABCDEF-_", min_size=8, max_size=64),
        st.builds(operator.mul, st.sampled_from(("a", "\U0001f600", "../", "%s")), st.integers(100, 30_000)),
    )


def corrupt(valid: st.SearchStrategy[bytes], string_fields: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    """Bytes that are not the message ``valid`` draws (mostly: noise sometimes parses)."""
    field = st.sampled_from(string_fields)
    return st.one_of(
        st.binary(max_size=64),
        st.builds(_bad_utf8, field, st.text(max_size=8), st.sampled_from(BAD_UTF8), st.text(max_size=8)),
        st.builds(wire.len_field, field, st.binary(min_size=1, max_size=12)),  # raw bytes as a string
        st.builds(_cut, valid, st.floats(0, 1)),
        st.builds(_lying_length, field, st.binary(max_size=16), st.integers(1, 2**64)),
        st.builds(_flip, valid, st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), min_size=1)),
        st.builds(_groups, st.integers(1, 20_000), st.booleans()),
        st.builds(_wrong_wire_type, field, st.sampled_from((0, 1, 3, 4, 5, 6, 7))),
        st.builds(bytes.__add__, valid, st.binary(min_size=1, max_size=16)),  # trailing garbage
    )


def _bad_utf8(field: int, before: str, bad: bytes, after: str) -> bytes:
    return wire.len_field(field, before.encode() + bad + after.encode())


def _cut(data: bytes, fraction: float) -> bytes:
    """A message truncated at any byte: a length prefix may then promise more than follows."""
    return data[: int(len(data) * fraction)]


def _lying_length(field: int, payload: bytes, extra: int) -> bytes:
    return wire.len_field(field, payload, claimed=len(payload) + extra)


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data or b"\x00")
    for position, mask in flips:
        out[position % len(out)] ^= mask
    return bytes(out)


def _groups(depth: int, closed: bool) -> bytes:
    """Nested (deprecated) groups in an unknown field: past protobuf's recursion limit, or unclosed."""
    unknown = 15
    opened = wire.key(unknown, wire.SGROUP) * depth
    return opened + (wire.key(unknown, wire.EGROUP) * depth if closed else b"")


def _wrong_wire_type(field: int, wire_type: int) -> bytes:
    # Types 6 and 7 do not exist; the others do not fit a string field.
    return wire.key(field, wire_type) + b"\x01\x02\x03\x04\x05\x06\x07\x08"
