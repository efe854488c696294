"""Stop strings, host side: validation, each token's text as bytes, and the per-token progress
tables the decoding loops follow (`jaxgen.decoding.stops`).

A token's text is what it adds to the decoded string: SentencePiece pieces read `▁` as a space
and byte pieces `<0x0A>` as that byte; byte-level BPE vocabularies (GPT-2's `Ġ`/`Ċ` alphabet) map
each character back to its byte; other tokens are their UTF-8 text. End tokens and the unknown
token add nothing. Matching works on bytes, so a string may end inside a multi-byte character
split over byte tokens.
"""

from __future__ import annotations

import collections
import re
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jaxgen.runtime.batching import bucket

MAX_STOP_BYTES = 256  # longest stop string (UTF-8 bytes); the tables grow with it
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"


def check_stop_strings(value) -> Tuple[str, ...]:
    """None, a string or a list of strings -> a tuple of distinct non-empty strings, in order.
    TypeError / ValueError name the bad entry."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"stop_strings must be a string or a list of strings, got {type(value).__name__}")
    out: List[str] = []
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise TypeError(f"stop_strings[{i}] must be a str, got {type(s).__name__}")
        if not s:
            raise ValueError(f"stop_strings[{i}] is empty")
        if len(s.encode("utf-8")) > MAX_STOP_BYTES:
            raise ValueError(f"stop_strings[{i}] is longer than {MAX_STOP_BYTES} bytes (UTF-8)")
        if s not in out:
            out.append(s)
    return tuple(out)


def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def token_texts(tokens: Sequence[str], silent: Sequence[int] = ()) -> List[bytes]:
    """Each token's text as bytes (see the module docstring); ids in `silent` add nothing."""
    sentencepiece = any(_SP_SPACE in t or _BYTE_PIECE.match(t) for t in tokens)
    byte_level = not sentencepiece and any("\u0120" in t or "\u010a" in t for t in tokens)
    decoder = _byte_decoder() if byte_level else {}
    out = []
    for t in tokens:
        if sentencepiece:
            m = _BYTE_PIECE.match(t)
            out.append(bytes([int(m.group(1), 16)]) if m else t.replace(_SP_SPACE, " ").encode("utf-8"))
        elif byte_level and all(c in decoder for c in t):
            out.append(bytes(decoder[c] for c in t))
        else:  # added tokens of a byte-level vocabulary are plain text
            out.append(t.encode("utf-8"))
    for i in silent:
        if 0 <= i < len(out):
            out[i] = b""
    return out


def _automaton(pattern: bytes) -> np.ndarray:
    """KMP automaton [L + 1, 256] int32: progress after one byte; L (occurred) is absorbing."""
    n = len(pattern)
    delta = np.zeros((n + 1, 256), np.int32)
    delta[0, pattern[0]] = 1
    fallback = 0
    for q in range(1, n):
        delta[q] = delta[fallback]
        delta[q, pattern[q]] = q + 1
        fallback = delta[fallback, pattern[q]]
    delta[n] = n
    return delta


class _Texts:
    """A vocabulary's token texts as a byte matrix, tokens sorted by decreasing length, so that the
    tokens still running at byte j are a prefix of the rows."""

    def __init__(self, texts: List[bytes]):
        lengths = np.array([len(t) for t in texts], np.int64)
        self.order = np.argsort(-lengths, kind="stable")
        width = int(lengths.max()) if len(texts) else 0
        self.bytes = np.zeros((len(texts), max(width, 1)), np.uint8)
        for row, i in enumerate(self.order):
            self.bytes[row, :lengths[i]] = np.frombuffer(texts[i], np.uint8)
        sorted_len = lengths[self.order]
        self.running = [int(np.sum(sorted_len > j)) for j in range(width)]  # tokens with a byte j


def progress_table(texts: "_Texts", pattern: bytes) -> np.ndarray:
    """[L, V] int32: progress on `pattern` after each token, from each progress 0..L-1."""
    delta = _automaton(pattern)
    n = len(pattern)
    state = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (n, texts.bytes.shape[0])).copy()
    for j, count in enumerate(texts.running):
        state[:, :count] = delta[state[:, :count], texts.bytes[None, :count, j]]
    out = np.empty_like(state)
    out[:, texts.order] = state
    return out


class StopTables:
    """The progress tables of stop-string sets for one vocabulary, cached (LRU)."""

    def __init__(self, tokens: Sequence[str], silent: Sequence[int] = (), cache_size: int = 16):
        """silent: ids that add no text whatever the call (the unknown token)."""
        self._tokens = list(tokens)
        self._silent = tuple(silent)
        self._texts: Optional[_Texts] = None
        self._cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def tables(self, strings: Tuple[str, ...], silent: Sequence[int] = ()) -> Tuple[np.ndarray, np.ndarray]:
        """(table [S, P, V] int8/int16, lengths [S] int32) for `strings`, S and P bucketed (S = 0
        when there are none); ids in `silent` (the call's end tokens) add no text."""
        key = (strings, tuple(sorted(set(silent))))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        v = len(self._tokens)
        if not strings:
            result = (np.zeros((0, 1, v), np.int8), np.zeros((0,), np.int32))
        else:
            texts = self._texts_for()
            patterns = [s.encode("utf-8") for s in strings]
            p = bucket(max(len(x) for x in patterns), minimum=8)
            dtype = np.int8 if p < 127 else np.int16
            table = np.zeros((bucket(len(patterns), minimum=1), p, v), dtype)
            lengths = np.zeros((table.shape[0],), np.int32)
            for i, pattern in enumerate(patterns):
                part = progress_table(texts, pattern)
                part[:, [t for t in key[1] if 0 <= t < v]] = np.arange(len(pattern))[:, None]  # silent: no progress
                table[i, :len(pattern)] = part
                lengths[i] = len(pattern)
            result = (table, lengths)
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return result

    def _texts_for(self) -> _Texts:
        with self._lock:
            if self._texts is None:
                self._texts = _Texts(token_texts(self._tokens, self._silent))
            return self._texts
