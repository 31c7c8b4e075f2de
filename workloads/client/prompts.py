"""Prompts for an endpoint's requests: synthetic ones of the drawn token length, or sampled from a file.

Seeded as ``loadgen.prompt_tokens`` is: request ``rid``'s prompt depends only on the seed and ``rid``. With a
tokenizer (a local directory holding ``tokenizer.json``, read by the ``tokenizers`` library) a synthetic prompt
has exactly the drawn length: random ids decoded, re-encoded and trimmed. Without one a prompt is one word per
token and lengths are approximate. Files: ShareGPT JSON (a list of ``{"conversations": [{"from": "human",
"value": ...}, ...]}``; the first human turn) or JSONL (``{"prompt": ...}`` or ``{"text": ...}`` per line).
No network, no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from workloads.engine.loadgen import prompt_tokens

#: Without a tokenizer: words of one common token each (in GPT-2-like vocabularies), drawn per position.
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
         "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you",
         "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will",
         "would", "who", "so", "no")


def load_tokenizer(directory: str) -> Any:
    """The ``tokenizers.Tokenizer`` of ``directory/tokenizer.json``; ValueError (one line) when unreadable."""
    path = Path(directory) / "tokenizer.json"
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except ImportError:
        raise ValueError("--tokenizer needs the tokenizers package (pip install tokenizers)") from None
    except Exception as exc:  # tokenizers raises its own Exception for a missing or malformed file
        raise ValueError(f"--tokenizer {directory}: cannot read {path.name} ({str(exc).splitlines()[0][:120]})") \
            from None


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` without special tokens."""
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


_NONE_FOUND = "no prompts found (expected ShareGPT JSON or JSONL of {\"prompt\": ...} or {\"text\": ...})"


def read_prompts(path: str) -> list[str]:
    """The prompts of a ShareGPT JSON or a JSONL file; ValueError (one line) when unreadable or holding none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        whole = json.loads(text)
        rows = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"--prompts {path}: line {n} is not JSON (expected ShareGPT JSON or JSONL)") from None
    out = [p for row in rows if (p := _prompt_of(row))]
    if not out:
        raise ValueError(f"--prompts {path}: {_NONE_FOUND}")
    return out


def _prompt_of(row: Any) -> str | None:
    """A ShareGPT conversation's first human turn, or a JSONL row's ``prompt`` or ``text``."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("conversations"), list):
        return next((t["value"] for t in row["conversations"] if isinstance(t, dict)
                     and t.get("from") in ("human", "user") and isinstance(t.get("value"), str) and t["value"]),
                    None)
    value = row.get("prompt", row.get("text"))
    return value if isinstance(value, str) and value else None


class Prompts:
    """Request ``rid``'s prompt text and its length in tokens (exact with a tokenizer, else approximate)."""

    def __init__(self, seed: int, tokenizer: Any = None, file: str = "") -> None:
        self.seed, self.tokenizer = seed, tokenizer
        self.file_prompts = read_prompts(file) if file else None

    @property
    def exact(self) -> bool:
        """Whether prompt lengths are counted by a tokenizer (else: one word per token, approximate)."""
        return self.tokenizer is not None

    def source(self) -> str:
        return "file" if self.file_prompts is not None else "synthetic"

    def get(self, rid: int, length: int) -> tuple[str, int]:
        """The prompt of request ``rid`` (``length`` tokens for a synthetic one) and its token count."""
        if self.file_prompts is not None:
            rng = np.random.default_rng([self.seed, 3, rid])
            text = self.file_prompts[int(rng.integers(len(self.file_prompts)))]
            n = count_tokens(self.tokenizer, text) if self.tokenizer is not None else len(text.split())
            return text, max(n, 1)
        if self.tokenizer is None:
            ids = prompt_tokens(self.seed, rid, length, len(WORDS))
            return " ".join(WORDS[i] for i in ids), length
        return self._exact(rid, length)

    def _exact(self, rid: int, length: int) -> tuple[str, int]:
        """Random ids decoded, re-encoded and trimmed to ``length`` (padded with more ids when short)."""
        tok = self.tokenizer
        vocab = tok.get_vocab_size()
        ids = [int(i) for i in prompt_tokens(self.seed, rid, length, vocab)]
        rng = np.random.default_rng([self.seed, 4, rid])
        text = ""
        for _ in range(8):
            text = tok.decode(ids)
            got = tok.encode(text, add_special_tokens=False).ids
            if len(got) == length:
                return text, length
            if len(got) > length:
                ids = got[:length]
            else:
                ids = got + [int(i) for i in rng.integers(0, vocab, length - len(got))]
        return text, count_tokens(tok, text)
