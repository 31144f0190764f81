"""The simulated vLLM server's HTTP routes: vLLM's OpenAI routes, /health, /metrics, the
dev-mode sleep routes, and /ebbtide/stats."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import generate_latest

from ebbtide.sim.engine_sim import (
    CHARS_PER_TOKEN,
    DEFAULT_MAX_TOKENS,
    TOKEN_TEXT,
    EngineDead,
    EngineSimulator,
)
from ebbtide.sim.engine_types import EngineBusy, EngineSleeping, Finished, FirstToken, Tokens

log = logging.getLogger("ebbtide.engine-sim")


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


def _estimate_prompt_tokens(body: Mapping, chat: bool) -> int:
    explicit = body.get("ebbtide_prompt_tokens")
    if explicit is not None:
        if not isinstance(explicit, int) or isinstance(explicit, bool) or explicit < 1:
            raise ValueError("ebbtide_prompt_tokens must be a positive integer")
        return explicit
    chars = 0
    if chat:
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.get("text", "")) for p in content if isinstance(p, Mapping))
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            chars = len(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)  # token ids
        elif isinstance(prompt, list):
            chars = sum(len(p) for p in prompt if isinstance(p, str))
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def _max_tokens(body: Mapping, chat: bool) -> int:
    value = body.get("max_completion_tokens") if chat else None
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("max_tokens must be a positive integer")
    return value


class Routes:
    def __init__(self, sim: EngineSimulator) -> None:
        self.sim = sim

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.sim.dead else 200)  # 200 while asleep too, like vLLM

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "ebbtide-engine-sim"})

    async def models(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response({"object": "list", "data": [{
            "id": sim.served_model_name, "object": "model", "created": sim.created, "owned_by": "vllm",
            "root": sim.model_path, "parent": None, "max_model_len": sim.model.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.sim.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def stats(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response({**dataclasses.asdict(sim.stats), "is_sleeping": sim.asleep,
                                  "sleep_level": sim.core.sleep_level, "num_running": sim.core.num_running,
                                  "num_waiting": sim.core.num_waiting})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        sim = self.sim
        sim.stats.requests_received += 1
        if sim.asleep:
            sim.stats.requests_refused_asleep += 1
            log.warning("refused a request: engine is asleep")
            return _error(503, "The engine is sleeping; wake it up with POST /wake_up first.",
                          "ServiceUnavailableError")
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            prompt_tokens = _estimate_prompt_tokens(body, chat)
            max_tokens = _max_tokens(body, chat)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return _error(400, str(exc), "BadRequestError")
        model = body.get("model")
        if model is not None and model != sim.served_model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            queue = sim.submit(request_id, prompt_tokens, max_tokens)
        except EngineSleeping as exc:  # unreachable after the check above, kept for safety
            sim.stats.requests_refused_asleep += 1
            return _error(503, str(exc), "ServiceUnavailableError")
        except EngineDead as exc:
            return _error(500, str(exc), "InternalServerError")
        except ValueError as exc:
            return _error(400, str(exc), "BadRequestError")
        finished = False
        try:
            if body.get("stream"):
                response = await self._stream(request, body, chat, request_id, queue)
            else:
                response = await self._complete(chat, request_id, queue, prompt_tokens, max_tokens)
            finished = True
            return response
        finally:
            sim.release(request_id, finished)

    async def _complete(self, chat: bool, request_id: str, queue: asyncio.Queue, prompt_tokens: int,
                        max_tokens: int) -> web.Response:
        while not isinstance(event := await queue.get(), Finished):
            if event is None:
                return _error(500, "the engine loop has crashed", "InternalServerError")
        text = TOKEN_TEXT * max_tokens
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return web.json_response({
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.sim.served_model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                      "total_tokens": prompt_tokens + max_tokens}})

    async def _stream(self, request: web.Request, body: Mapping, chat: bool, request_id: str,
                      queue: asyncio.Queue) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created, model = int(time.time()), self.sim.served_model_name

        def chunk(delta_text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else {}
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish_reason}
            payload = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            await response.write(chunk(None, role=True).encode())
        while True:
            event = await queue.get()
            if isinstance(event, FirstToken):
                await response.write(chunk(TOKEN_TEXT).encode())
            elif isinstance(event, Tokens):
                await response.write("".join(chunk(TOKEN_TEXT) for _ in range(event.count)).encode())
            elif event is None:  # engine crashed: end the stream without [DONE]
                await response.write_eof()
                return response
            else:
                break
        tail = [chunk(None if chat else "", "length")]
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.output_tokens,
                     "total_tokens": event.prompt_tokens + event.output_tokens}
            tail.append("data: " + json.dumps({
                "id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model, "choices": [], "usage": usage}) + "\n\n")
        tail.append("data: [DONE]\n\n")
        await response.write("".join(tail).encode())
        await response.write_eof()
        return response

    async def sleep(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.stats.sleep_calls += 1
        try:
            level = int(request.query.get("level", "1"))
            sim.sleep(level)
        except ValueError as exc:
            return _error(400, f"bad sleep level: {exc}", "BadRequestError")
        except EngineBusy as exc:
            sim.stats.sleeps_refused += 1
            log.warning("refused /sleep: %s", exc)
            return _error(409, f"{exc}; drain the replica before putting it to sleep.", "ConflictError")
        log.info("asleep at level %d", level)
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        self.sim.stats.wake_up_calls += 1
        await self.sim.wake_up()  # ?tags= is accepted and ignored: one call wakes everything
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sim.asleep})

    async def no_op(self, request: web.Request) -> web.Response:
        # /reset_prefix_cache and /collective_rpc (reload_weights) in the level-2 wake sequence.
        return web.json_response({}) if request.path == "/collective_rpc" else web.Response(status=200)
