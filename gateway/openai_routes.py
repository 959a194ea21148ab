"""`POST /v1/chat/completions` and `POST /v1/completions`: OpenAI's API over
llmq's queue. Each call is admitted exactly as `POST /v1/requests` is
(recorded, held to the key's rate, enqueued, `Idempotency-Key` honoured), so
scaling, priorities, deadlines, cancel, traces and metrics apply unchanged;
then it is waited on, or streamed from the request's token stream. A client
that hangs up cancels its request, so the engine stops generating it. A repeat
of a deterministic call may be answered from the result cache, as any submit
may (its record is final at once; `Cache-Status` says so)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway.admission import IDEMPOTENCY_KEY, fingerprint_of
from gateway.errors import ApiError, redis_down
from gateway.openai_compat import (
    SSE_DONE,
    Kind,
    OpenAICall,
    OpenAIError,
    StreamChunks,
    completion_response,
    limit_error,
    parse_openai_body,
    sse,
    view_error,
)
from gateway.streaming import KEEP_ALIVE, StreamGone, client_gone, follow, open_event_stream
from shared.schema import RequestView

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

PATHS = ("/v1/chat/completions", "/v1/completions")


def openai_error(exc: ApiError) -> OpenAIError:
    """An error of the shared paths (auth, rate limit, admission, Redis or broker down)
    in OpenAI's shape and statuses: a field error is a 400 there, an unserved model a 404."""
    status = 404 if exc.type == "model_not_found" else 400 if exc.status == 422 else exc.status
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, exc.message, exc.field, exc.type, kind, exc.headers)


class OpenAIRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATHS[0], self.chat_completions), web.post(PATHS[1], self.completions)]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, "completion")

    async def _call(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        gw = self.gateway
        # 1) who, and what: OpenAI's body as an llmq request, held to the same limits
        tenant = await gw.authenticate(request)
        call = parse_openai_body(kind, await gw.read_body(request))
        over = call.spec.over_limits(gw.settings.max_prompt_chars, gw.settings.max_tokens_limit)
        if over is not None:
            raise limit_error(call, over)
        if call.spec.deadline is not None and call.spec.deadline.timestamp() <= time.time():
            raise OpenAIError(400, "deadline: already passed; no worker could start it in time", "deadline",
                              "invalid_value")
        call = dataclasses.replace(call, spec=await gw.route_model(call.spec, tenant))
        await gw.check_served(call.spec.model)
        # 2) admitted as POST /v1/requests admits; a retry with the same Idempotency-Key gets the same request
        fingerprint = f"{kind}:{call.stream}:{call.include_usage}:{fingerprint_of(call.spec)}" \
            if IDEMPOTENCY_KEY in request.headers else ""
        admitted = await gw.admit(request, call.spec, tenant, fingerprint)
        # 3) the answer, streamed or once final
        if call.stream:
            return await self._stream(request, call, admitted.id, admitted.headers)
        return await self._complete(request, call, admitted.id, admitted.headers)

    async def _complete(self, request: web.Request, call: OpenAICall, request_id: str,
                        headers: dict[str, str]) -> web.Response:
        gw = self.gateway
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gw.settings.completion_timeout_seconds
        try:
            while True:
                # In short waits, to notice a client that hung up.
                view = await gw.waiter.wait(request_id, min(1.0, max(deadline - loop.time(), 0.0)))
                if view is None or view.status.is_final:
                    break
                if client_gone(request):
                    await self._abandon(request_id, "client_disconnected")
                    return web.Response(status=499)  # nobody reads it; logged and counted as such
                if loop.time() >= deadline:
                    raise await self._timed_out(request_id)
        except asyncio.CancelledError:  # where aiohttp cancels the handlers of closed connections
            await asyncio.shield(self._abandon(request_id, "client_disconnected"))
            raise
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc  # in OpenAI's shape: see openai_error
        if view is None:
            raise OpenAIError(500, "the request's record expired before it finished", None, "expired",
                              "server_error")
        try:
            body = completion_response(call, request_id, view)
        except OpenAIError as exc:
            exc.headers = {**exc.headers, "x-request-id": request_id}
            raise
        return web.json_response(body, headers={"x-request-id": request_id, **headers})

    async def _stream(self, request: web.Request, call: OpenAICall, request_id: str,
                      headers: dict[str, str]) -> web.StreamResponse:
        gw = self.gateway
        try:
            await gw.streams.attach(request_id)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc  # in OpenAI's shape: see openai_error
        chunks = StreamChunks(call, request_id, int(time.time()), call.model)
        response = await open_event_stream(request, {"x-request-id": request_id, **headers})
        sent = ""  # the text the client has
        deadline = asyncio.get_running_loop().time() + gw.settings.completion_timeout_seconds
        try:
            await response.write(sse(chunks.first()))
            async for piece in follow(gw.streams, gw.stream_hub, request_id):
                if asyncio.get_running_loop().time() >= deadline:
                    await response.write(sse((await self._timed_out(request_id)).body()))
                    return response
                if piece.kind == "idle":
                    if client_gone(request):
                        raise ConnectionResetError("client gone")
                    await response.write(KEEP_ALIVE)
                    continue
                if piece.kind == "end":
                    await response.write(await self._ending(chunks, request_id))
                    return response
                if piece.kind == "reset" and not piece.text.startswith(sent):
                    # Another worker ran it again and wrote other text: what was sent can't be taken back.
                    await response.write(sse(OpenAIError(
                        500, "the request was run again after its worker stopped, with different text; retry it",
                        None, "restarted", "server_error").body()))
                    return response
                text = piece.text[len(sent):] if piece.kind == "reset" else piece.text
                if text:
                    sent += text
                    await response.write(sse(chunks.delta(text)))
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # Gone (a failed write or a closed transport; or, where aiohttp cancels the
            # handlers of closed connections, cancelled): nobody reads the rest.
            await asyncio.shield(self._abandon(request_id, "client_disconnected"))
            if isinstance(exc, asyncio.CancelledError):
                raise
        except (RedisError, OSError, StreamGone) as exc:
            log.warning("stream_lost", request_id=request_id, error=repr(exc))
            await response.write(sse(OpenAIError(503, "the token stream was lost (the result store restarted or "
                                                 "it expired); the request's record may still hold its result",
                                                 None, "stream_lost", "server_error").body()))
        return response

    async def _ending(self, chunks: StreamChunks, request_id: str) -> bytes:
        """The stream's last chunks: the finish reason, usage if asked, [DONE]; or the error."""
        view: RequestView | None = await self.gateway.store.get(request_id)
        error = view_error(view) if view is not None else OpenAIError(
            500, "the request's record expired before it finished", None, "expired", "server_error")
        if error is not None:
            return sse(error.body())
        ending = sse(chunks.final(view.output.finish_reason if view.output else None))
        if chunks.call.include_usage and view.usage is not None:
            ending += sse(chunks.usage(view.usage))
        return ending + SSE_DONE

    async def _timed_out(self, request_id: str) -> OpenAIError:
        """Cancel a request that did not end within LLMQ_COMPLETION_TIMEOUT_SECONDS, and say so."""
        await self._abandon(request_id, "timeout")
        timeout = self.gateway.settings.completion_timeout_seconds
        return OpenAIError(504, f"not finished within {timeout:g} s (LLMQ_COMPLETION_TIMEOUT_SECONDS); the request "
                           "was cancelled", None, "timeout", "server_error",
                           {"x-request-id": request_id, "x-should-retry": "false"})

    async def _abandon(self, request_id: str, reason: str) -> None:
        """Cancel a request nobody waits for any more: its worker stops generating it."""
        log.info("request_abandoned", request_id=request_id, reason=reason)
        try:
            await self.gateway.store.cancel(request_id)
        except (RedisError, OSError) as exc:
            log.warning("abandon_failed", request_id=request_id, error=str(exc))
            return
        await self.gateway.webhook_completed(request_id)
