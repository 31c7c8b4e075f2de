"""Server-Sent Events, as OpenAI-compatible servers stream them: ``data:`` lines, events ending at a blank line.

Tolerates comments (``: keep-alive``), CRLF/CR/LF line ends, multi-line data (joined with newlines), ``event``,
``id`` and ``retry`` fields, and chunks split anywhere (mid-line, mid-UTF-8 character). A line naming no SSE
field, or bytes that are not UTF-8, raise :class:`SSEError`: the request fails as "malformed SSE".
"""

from __future__ import annotations

import codecs
import re

_FIELDS = frozenset({"data", "event", "id", "retry"})
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEError(ValueError):
    """A stream that is not Server-Sent Events; the message is one line."""


class SSEParser:
    """Feed it the bytes as they come; it returns the data of each event completed so far."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buf = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that ``chunk`` completes, in order (comments and empty events give none)."""
        try:
            self._buf += self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise SSEError(f"not UTF-8 ({exc.reason})") from None
        out: list[str] = []
        while True:
            m = _LINE_END.search(self._buf)
            # a CR at the very end may be the first half of a CRLF split across chunks: wait for more
            if m is None or (m.group() == "\r" and m.end() == len(self._buf)):
                break
            line, self._buf = self._buf[:m.start()], self._buf[m.end():]
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def close(self) -> list[str]:
        """The end of the stream: a last event not ended by a blank line is dispatched."""
        out = self.feed(b"")
        if self._buf:
            event = self._line(self._buf.rstrip("\r"))
            self._buf = ""
            if event is not None:
                out.append(event)
        if self._data:
            out.append("\n".join(self._data))
            self._data = []
        return out

    def _line(self, line: str) -> str | None:
        if not line:  # a blank line ends the event
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, colon, value = line.partition(":")
        if name not in _FIELDS:
            raise SSEError(f"a line that is no SSE field: {line[:80]!r}")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None
