"""The OpenAI-compatible HTTP API over an EngineThread (aiohttp): GET /v1/models, POST /v1/completions and
/v1/chat/completions (streamed as server-sent events, or whole), GET /health.

Decoding is greedy whatever ``temperature`` says, and the engine has no end-of-sequence stop: a request gets exactly
``max_tokens`` (or ``max_completion_tokens``; default 16) tokens, ``finish_reason`` "length". ``min_tokens`` and
``ignore_eos`` are accepted (they change nothing). A chat's messages are joined as ``role: content`` lines followed by
``assistant:``. What the engine cannot do (several choices, stop strings, echo, log-probabilities) and malformed
requests get a 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from workloads.api_server.worker import DONE, EngineThread, Job

#: ``max_tokens`` when a request gives none.
DEFAULT_MAX_TOKENS = 16


class BadRequest(Exception):
    """A request the API refuses: a 400 with ``message`` (and the ``param`` and ``code`` it concerns)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def _int(body: dict[str, Any], key: str, default: int | None, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"{key} must be an integer >= {low}, not {json.dumps(value)}", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, not {json.dumps(value)}", key)
    return value


def _chat_text(messages: Any) -> str:
    """The messages as ``role: content`` lines and a last ``assistant:`` (text parts of a content list joined)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a role and a content", "messages")
        content = m.get("content") or ""
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest("a message's content must be text or a list of text parts", "messages")
        lines.append(f"{m['role']}: {content}")
    return "\n".join([*lines, "assistant:"])


class Api:
    """The routes, over one EngineThread, one text codec and one model name."""

    def __init__(self, worker: EngineThread, codec: Any, name: str, cache_len: int, vocab: int) -> None:
        self.worker, self.codec, self.name, self.cache_len, self.vocab = worker, codec, name, cache_len, vocab
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "btune",
             "max_model_len": self.cache_len}]})

    async def health(self, request: web.Request) -> web.Response:
        """Liveness and the engine's counts: running, waiting, finished, cancelled (client gone), steps."""
        return web.json_response({"status": "ok", **self.worker.stats})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _prompt(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            return self.codec.encode(_chat_text(body.get("messages")))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.codec.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.vocab for t in prompt):
                raise BadRequest(f"a prompt token id is outside the vocabulary (0..{self.vocab - 1})", "prompt")
            return list(prompt)
        raise BadRequest("prompt must be one string or one list of token ids (one prompt per request)", "prompt")

    def _parse(self, body: Any, chat: bool) -> tuple[list[int], int, bool, bool]:
        """The prompt's ids, max_tokens, stream, include_usage; BadRequest for what the API refuses."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.name:
            raise BadRequest(f"the model {json.dumps(model)} does not exist; this server serves {self.name!r}",
                             "model", "model_not_found")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, key, DEFAULT_MAX_TOKENS, 1)
        assert max_tokens is not None
        min_tokens = _int(body, "min_tokens", 0, 0)
        if min_tokens is not None and min_tokens > max_tokens:
            raise BadRequest(f"min_tokens {min_tokens} is more than {key} {max_tokens}", "min_tokens")
        _flag(body, "ignore_eos")
        temperature = body.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or temperature < 0):
            raise BadRequest("temperature must be a number >= 0 (decoding is greedy whatever it is)", "temperature")
        if _int(body, "n", 1, 1) != 1:
            raise BadRequest("n: one choice per request only", "n")
        if body.get("stop") not in (None, "", []):
            raise BadRequest("stop sequences are not supported (the engine produces exactly max_tokens)", "stop")
        for key_ in ("echo", "logprobs", "top_logprobs", "best_of"):
            if body.get(key_) not in (None, False, 0, 1 if key_ == "best_of" else 0):
                raise BadRequest(f"{key_} is not supported", key_)
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        usage = bool(options and _flag(options, "include_usage"))
        ids = self._prompt(body, chat)
        if not ids:
            raise BadRequest("the prompt is empty", "messages" if chat else "prompt")
        if len(ids) + max_tokens > self.cache_len:
            raise BadRequest(f"the prompt's {len(ids)} tokens plus {key} {max_tokens} exceed the model's "
                             f"{self.cache_len} positions per sequence", key, "context_length_exceeded")
        return ids, max_tokens, stream, usage

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body is not valid JSON")
        try:
            ids, max_tokens, stream, include_usage = self._parse(body, chat)
        except BadRequest as exc:
            return error_response(400, str(exc), exc.param, exc.code)
        job = Job(ids, max_tokens, asyncio.get_running_loop())
        out = _Output(chat, self.name, len(ids), max_tokens)
        decoder = self.codec.decoder()
        self.worker.submit(job)
        finished = False
        try:
            if not stream:
                pieces = []
                while (item := await job.out.get()) is not DONE:
                    if isinstance(item, Exception):
                        return error_response(500, str(item), kind="server_error")
                    pieces.append(decoder.push(item, len(pieces) + 1 == max_tokens))
                finished = True
                return web.json_response(out.whole("".join(pieces)))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            try:
                finished = await self._stream(request, resp, job, out, decoder, include_usage)
            except ConnectionResetError:  # the client went away mid-stream
                pass
            return resp
        finally:
            if not finished:  # the client went away (or the handler failed): free the request's slot
                self.worker.cancel(job)

    async def _stream(self, request: web.Request, resp: web.StreamResponse, job: Job, out: _Output, decoder: Any,
                      include_usage: bool) -> bool:
        """Stream ``job``'s tokens as server-sent events; True once the engine is done with it."""
        max_tokens, chat, finished = out.usage["completion_tokens"], out.chat, False
        await resp.prepare(request)
        if chat:
            await resp.write(out.sse(out.chunk({"role": "assistant", "content": ""}, None)))
        n = 0
        while (item := await job.out.get()) is not DONE:
            if isinstance(item, Exception):
                finished = True
                await resp.write(out.sse({"error": {"message": str(item), "type": "server_error",
                                                    "param": None, "code": None}}))
                break
            n += 1
            text = decoder.push(item, n == max_tokens)
            await resp.write(out.sse(out.chunk(text, "length" if n == max_tokens else None)))
        else:
            finished = True
            if include_usage:
                await resp.write(out.sse(out.usage_chunk()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return finished


class _Output:
    """The response objects of one request in OpenAI's shapes."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, piece: Any, finish: str | None) -> dict[str, Any]:
        """A streamed chunk: ``piece`` is the text (or, for chat, a delta dict or text)."""
        if self.chat:
            delta = piece if isinstance(piece, dict) else {"content": piece}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage}

    def whole(self, text: str) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage}

    @staticmethod
    def sse(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """HTTP errors and unexpected failures as OpenAI-style error bodies (the server keeps serving)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason or "error", kind="invalid_request_error")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # one request's failure, never the server's
        return error_response(500, f"{type(exc).__name__}: {exc}", kind="server_error")
