"""Request bodies for ``/completions`` and ``/chat/completions`` (streamed, exact lengths asked for) and the
fields a server may refuse.

Exact lengths: ``ignore_eos`` and ``min_tokens`` (vLLM, SGLang) make the server produce exactly the output
length; ``stream_options.include_usage`` asks for the token count in a last chunk; chat asks
``max_completion_tokens`` (OpenAI's current name) with ``max_tokens`` as the fallback. A server that answers
400/422 to one of these has it dropped (``probe``).
"""

from __future__ import annotations

from typing import Any

#: The optional fields, per API, in the order they are probed.
OPTIONAL = {"completions": ("stream_options", "ignore_eos", "min_tokens"),
            "chat": ("stream_options", "max_completion_tokens", "ignore_eos", "min_tokens")}
#: The path under the endpoint's base URL, per API.
PATHS = {"completions": "/completions", "chat": "/chat/completions"}
#: HTTP statuses that say the request's body was refused (a field the server does not take).
REFUSED = (400, 422)


def url_for(endpoint: str, api: str) -> str:
    """The full URL of ``api`` under ``endpoint`` (e.g. http://127.0.0.1:8000/v1 + /completions)."""
    return endpoint.rstrip("/") + PATHS[api]


def build_payload(api: str, model: str, prompt: str, output_len: int,
                  fields: frozenset[str] | set[str] | tuple[str, ...]) -> dict[str, Any]:
    """The streamed request body asking ``output_len`` tokens, with the optional ``fields`` that are used."""
    body: dict[str, Any] = {"model": model, "stream": True}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens" if "max_completion_tokens" in fields else "max_tokens"] = output_len
    elif api == "completions":
        body["prompt"] = prompt
        body["max_tokens"] = output_len
    else:
        raise ValueError(f"unknown API {api!r}: expected chat or completions")
    if "ignore_eos" in fields:
        body["ignore_eos"] = True
    if "min_tokens" in fields:
        body["min_tokens"] = output_len
    if "stream_options" in fields:
        body["stream_options"] = {"include_usage": True}
    return body


def content_of(api: str, chunk: dict[str, Any]) -> str:
    """The generated text a streamed chunk carries ("" for none: a role-only delta, the usage chunk)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if api == "chat":
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


def usage_tokens(chunk: dict[str, Any]) -> int | None:
    """The completion tokens a chunk's ``usage`` reports (None without one)."""
    usage = chunk.get("usage")
    n = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
