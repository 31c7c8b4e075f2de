"""Token streams: token files, text through a tokenizer, the bytes each token stands for, the sliding windows that
score each token once (the perplexity workload) and the training batches of a token file (``dense --data``).

Torch-free (numpy, and the ``tokenizers`` library for text), so the console checks a data file before launch with
the same code the workload loads it with. Every problem is a :class:`DataError` whose message is one line.

Formats (``--data-format``): ``npy`` (a 1-D integer array), ``bin`` (raw uint16 or uint32, native byte order, as
nanoGPT writes them), ``ints`` (a text file of whitespace-separated integers), ``text`` (UTF-8 text, tokenized by
a ``tokenizer.json``); ``auto`` picks by suffix (.npy, .bin), then text when a tokenizer was given, then by
content (only integers: ``ints``, else ``text``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("auto", "npy", "bin", "ints", "text")
BIN_DTYPES = ("uint16", "uint32")
_SNIFF = 64 * 1024
_INTS = re.compile(rb"[\s0-9+-]*")
_CHUNK = 1 << 22  # tokens hashed at a time


class DataError(ValueError):
    """A data or tokenizer file that cannot be scored as given; the message is one line."""


@dataclass
class Tokens:
    """A token stream: the ids, the UTF-8 bytes each token stands for (None when unknown), and where they came
    from (``format``, the tokenizer used, if any)."""

    ids: np.ndarray
    nbytes: np.ndarray | None
    format: str
    tokenizer: str | None = None
    bytes_note: str | None = None


def _readable(path: str, what: str = "--data") -> Path:
    """The path as a regular, readable file; DataError naming why not."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if not p.is_file():
        raise DataError(f"{what} {path}: not a regular file")
    if not os.access(p, os.R_OK):
        raise DataError(f"{what} {path}: cannot read it (permission denied)")
    if st.st_size == 0:
        raise DataError(f"{what} {path} is empty")
    return p


def resolve_format(path: str, fmt: str = "auto", tokenizer: bool = False) -> str:
    """The format of ``path`` (module docstring): ``fmt`` itself unless it is ``auto``."""
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".npy", ".bin"):
        return suffix[1:]
    if tokenizer:
        return "text"
    with open(_readable(path), "rb") as f:
        head = f.read(_SNIFF)
    return "ints" if _INTS.fullmatch(head) and any(c in b"0123456789" for c in head) else "text"


def read_ids(path: str, fmt: str, dtype: str = "uint16") -> np.ndarray:
    """The token ids of a token file (``npy``, ``bin``, ``ints``): 1-D, integer, not empty; memory-mapped where
    the format allows."""
    p = _readable(path)
    try:
        if fmt == "npy":
            try:
                ids = np.load(p, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise DataError(f"--data {path}: not a .npy array ({str(exc).splitlines()[0]})") from None
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise DataError(f"--data {path}: a token file holds a 1-D integer array, this one is "
                                f"{ids.dtype} of shape {ids.shape}")
        elif fmt == "bin":
            size = np.dtype(dtype).itemsize
            if p.stat().st_size % size:
                raise DataError(f"--data {path}: {p.stat().st_size} bytes is not a whole number of {dtype} ids "
                                "(--data-dtype uint16|uint32)")
            ids = np.memmap(p, dtype=dtype, mode="r")
        elif fmt == "ints":
            words = p.read_bytes().split()
            try:
                ids = np.array([int(w) for w in words], dtype=np.int64)
            except ValueError:
                bad = next(w for w in words if not re.fullmatch(rb"[+-]?[0-9]+", w))
                raise DataError(f"--data {path}: {bad[:40].decode(errors='replace')!r} is not an integer (a file "
                                "of token ids holds whitespace-separated integers; text needs --tokenizer)") from None
        else:
            raise DataError(f"--data {path}: {fmt} is not a token file format")
    except OSError as exc:
        raise DataError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    if len(ids) == 0:
        raise DataError(f"--data {path} is empty (no token ids)")
    return ids


def check_ids(ids: np.ndarray, vocab: int, path: str) -> None:
    """Every id in ``[0, vocab)``; DataError naming the first that is not."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < vocab:
        return
    bad = int(np.flatnonzero((ids < 0) | (ids >= vocab))[0])
    raise DataError(f"--data {path}: token id {int(ids[bad])} at position {bad} is outside the model's vocabulary "
                    f"({vocab} ids: 0..{vocab - 1})")


def read_text(path: str) -> str:
    """A text file's UTF-8 text; DataError when it is unreadable, not UTF-8 or holds only whitespace."""
    p = _readable(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--data {path}: not UTF-8 text (byte {exc.start}); a token file needs "
                        "--data-format npy|bin|ints") from None
    except OSError as exc:
        raise DataError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    if not text.strip():
        raise DataError(f"--data {path} is empty (only whitespace)")
    return text


def text_nonempty(path: str) -> None:
    """What the console checks of a text file before launch (no tokenizing): readable and not only whitespace."""
    with open(_readable(path), "rb") as f:
        while chunk := f.read(_SNIFF):
            if chunk.strip():
                return
    raise DataError(f"--data {path} is empty (only whitespace)")


def tokenizer_vocab(path: str) -> int:
    """How many ids a ``tokenizer.json`` can produce (its largest id + 1: the model's vocabulary, added tokens
    included), read from the JSON without loading the tokenizer."""
    p = _readable(path, "--tokenizer")
    try:
        doc = json.loads(p.read_bytes())
    except (ValueError, OSError) as exc:
        raise DataError(f"--tokenizer {path}: not a tokenizer.json ({str(exc).splitlines()[0]})") from None
    vocab = (doc.get("model") or {}).get("vocab") if isinstance(doc, dict) else None
    if isinstance(vocab, dict):
        ids = [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list):  # Unigram: [token, score] pairs, the id is the index
        ids = [len(vocab) - 1] if vocab else []
    else:
        raise DataError(f"--tokenizer {path}: not a tokenizer.json (no model.vocab)")
    ids += [t["id"] for t in doc.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    if not ids:
        raise DataError(f"--tokenizer {path}: its vocabulary is empty")
    return max(ids) + 1


def _tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    _readable(path, "--tokenizer")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the library raises its own exception types
        raise DataError(f"--tokenizer {path}: cannot load it ({str(exc).splitlines()[0]})") from None


def _char_bytes(text: str) -> np.ndarray:
    """For each character offset 0..len(text), the UTF-8 byte offset where it starts."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    starts = np.flatnonzero((data & 0xC0) != 0x80)
    return np.append(starts, len(data)).astype(np.int64)


def _token_bytes(offsets: list[tuple[int, int]], text: str) -> np.ndarray:
    """The bytes each token stands for: from its start to the next token's start (the text between two tokens
    belongs to the first), the last to its end; tokens that cover no text (special tokens) have none."""
    at = _char_bytes(text)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.maximum.accumulate(at[off[:, 0]])
    end = max(int(at[off[:, 1]].max()), int(starts[-1]))
    return np.diff(np.append(starts, end))


def tokenize(text_path: str, tokenizer_path: str) -> Tokens:
    """A text file through a tokenizer (as ``tokenizer(text)`` in transformers: the special tokens the tokenizer
    adds included), with the bytes of each token."""
    text = read_text(text_path)
    enc = _tokenizer(tokenizer_path).encode(text)
    if not enc.ids:
        raise DataError(f"--data {text_path}: the tokenizer made no tokens of it")
    return Tokens(np.asarray(enc.ids, dtype=np.int64), _token_bytes(enc.offsets, text), "text", tokenizer_path)


def decoded_bytes(ids: np.ndarray, tokenizer_path: str) -> tuple[np.ndarray | None, str | None]:
    """The bytes of each token of a token file, by decoding it with the tokenizer and encoding the text again: the
    byte counts when that gives the same ids back, else None and why."""
    tok = _tokenizer(tokenizer_path)
    text = tok.decode([int(i) for i in ids], skip_special_tokens=False)
    enc = tok.encode(text, add_special_tokens=False)
    if len(enc.ids) != len(ids) or not np.array_equal(np.asarray(enc.ids), np.asarray(ids)):
        return None, f"bits per byte unknown: {tokenizer_path} does not encode its own decoding of these tokens to " \
                     "the same ids"
    return _token_bytes(enc.offsets, text), None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_ids(ids: np.ndarray) -> str:
    """The sha256 of the ids as little-endian int64 (the same for the same tokens in any file format)."""
    h = hashlib.sha256()
    for i in range(0, len(ids), _CHUNK):
        h.update(np.ascontiguousarray(ids[i:i + _CHUNK], dtype="<i8").tobytes())
    return h.hexdigest()


def train_ids(path: str, fmt: str, dtype: str, *, vocab: int, need: int) -> np.ndarray:
    """The ids of a token file to train on (``read_ids``; ``fmt`` may be ``auto``): every id inside the vocabulary
    and at least ``need`` of them (one training sequence: --seq-len + 1); DataError (one line) otherwise, text
    included (training reads token ids)."""
    fmt = resolve_format(path, fmt)
    if fmt == "text":
        raise DataError(f"--data {path}: not token ids; training reads a token file (.npy, .bin, integers as text), "
                        "so tokenize text first")
    ids = read_ids(path, fmt, dtype)
    if len(ids) < need:
        raise DataError(f"--data {path}: {len(ids)} tokens; a training sequence takes {need} (--seq-len + 1)")
    check_ids(ids, vocab, path)
    return ids


def train_batch(ids: np.ndarray, length: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Training batch ``step``: ``batch`` runs of ``length`` contiguous tokens (int64, ``[batch, length]``) at
    offsets drawn uniformly by a generator seeded with ``(seed, step)``: the same batches for the same seed, in any
    order of steps."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(ids) - length + 1, size=batch)
    return np.asarray(ids[starts[:, None] + np.arange(length)], dtype=np.int64)


def windows(n: int, seq_len: int, stride: int) -> np.ndarray:
    """Hugging Face's sliding-window recipe over ``n`` tokens: rows ``(begin, end, score_from)``.

    Window k reads tokens ``[begin, end)``, ``begin = k * stride``, at most ``seq_len`` of them; it scores the tokens
    ``[score_from, end)``, each predicted from the tokens before it in the window: those the previous windows have
    not scored, from ``begin + 1`` on (the first token of a window has no context in it). The rest of the window is
    context only. The last window ends at ``n``. Every token is scored at most once; with ``stride < seq_len``
    every token but the first is scored, and with ``stride == seq_len`` every token but each window's first.
    """
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"windows: need seq_len >= 2 and 1 <= stride <= seq_len, got {seq_len}, {stride}")
    begins = np.arange(0, n, stride, dtype=np.int64)
    ends = np.minimum(begins + seq_len, n)
    last = int(np.argmax(ends == n))  # the first window to reach the end is the last (one always does)
    begins, ends = begins[: last + 1], ends[: last + 1]
    score_from = np.maximum(np.concatenate([[0], ends[:-1]]), begins + 1)
    keep = score_from < ends
    return np.stack([begins[keep], ends[keep], score_from[keep]], axis=1)
