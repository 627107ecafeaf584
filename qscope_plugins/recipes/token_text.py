"""How tokens read, byte-exactly: byte-level BPE tokens (Qwen's) can hold part of a UTF-8 character.

A Chinese character is often split over two tokens, so decoding tokens one at a time shows "\\ufffd".
:func:`token_bytes` recovers each token's raw bytes (through the byte-level alphabet when the tokenizer
uses one), and :func:`display` splits a token sequence's text so that every character appears once,
on the token that completes it, and the strings join to the sequence's exact text.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache


@cache
def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (printable characters for all 256 bytes) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def token_bytes(tokenizer, size: int) -> list[bytes]:
    """The raw bytes of token ids ``0..size-1`` (special tokens: their text)."""
    alphabet = _byte_alphabet() if _byte_level(tokenizer) else None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    out = []
    for i in range(size):
        piece = tokenizer.convert_ids_to_tokens(i) if alphabet is not None and i not in special else None
        if piece is not None and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def _split(data: bytes) -> tuple[str, bytes]:
    """The longest decodable prefix of ``data`` and the (at most 3-byte) incomplete rest."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace"), b""


def display(ids: Sequence[int], table: Sequence[bytes]) -> list[str]:
    """One string per token; a character split over tokens appears on the token that completes it."""
    out, pending = [], b""
    for t in ids:
        text, pending = _split(pending + (table[t] if 0 <= t < len(table) else f"<{t}>".encode()))
        out.append(text)
    if pending and out:
        out[-1] += pending.decode("utf-8", "replace")
    return out


def single(token_id: int, table: Sequence[bytes]) -> str:
    """One token on its own: its text, or its bytes when they are not whole characters."""
    if not 0 <= token_id < len(table):
        return f"<{token_id}>"
    try:
        return table[token_id].decode("utf-8")
    except UnicodeDecodeError:
        return repr(table[token_id])


def label(token_id: int, table: Sequence[bytes]) -> str:
    """A quoted label for a token in a list: ``' the'``, or ``b'\\xe7'`` for part of a character."""
    if not 0 <= token_id < len(table):
        return f"<{token_id}>"
    try:
        return repr(table[token_id].decode("utf-8"))
    except UnicodeDecodeError:
        return repr(table[token_id])
