"""Text to token ids and back: a checkpoint's tokenizer.json (the ``tokenizers`` library), or, for a preset's random
weights, a deterministic word code: each whitespace-separated word hashed to an id (``t<id>`` maps back to that id),
each output token written `` t<id>``."""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

_WORD_ID = re.compile(r"t(\d+)")


class WordCodec:
    """The code for random weights: words in, `` t<id>`` out (no tokenizer to honour)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            m = _WORD_ID.fullmatch(word)
            known = m is not None and int(m.group(1)) < self.vocab
            out.append(int(m.group(1)) if m and known else zlib.crc32(word.encode()) % self.vocab)
        return out

    def decoder(self) -> Any:
        return _WordDecoder()


class _WordDecoder:
    def push(self, token: int, last: bool = False) -> str:
        return f" t{token}"


class TokenizerCodec:
    """A tokenizer.json: the prompt encoded with the tokenizer's special tokens (a llama's BOS), the output decoded
    incrementally (a token completing a character emits it; concatenated, the pieces are the decoded text)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decoder(self) -> Any:
        return _IncrementalDecoder(self.tokenizer)


class _IncrementalDecoder:
    """The text each new token adds: the decoding of a short window of recent tokens, less that of the window
    without the new ones; held back while it ends in an incomplete character (U+FFFD), flushed at the end."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # window start; tokens already turned into text

    def push(self, token: int, last: bool = False) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (last or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


def codec_for(checkpoint: str, vocab: int) -> WordCodec | TokenizerCodec:
    """The checkpoint's tokenizer.json when it has one, else the word code over ``vocab`` ids."""
    if checkpoint and (Path(checkpoint) / "tokenizer.json").is_file():
        return TokenizerCodec(Path(checkpoint) / "tokenizer.json")
    return WordCodec(vocab)
