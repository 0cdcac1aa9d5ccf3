"""The OpenAI-compatible HTTP app around one loaded `Engine`.

Every request body is read with a size limit, parsed as JSON and validated against the
models of `protocol` before anything touches the engine; every failure is an OpenAI error
object (`{"error": {"message", "type", "param", "code"}}`) with its status, and no failure
leaves state behind: a request becomes an engine stream only once it is valid, and the
stream leaves the batch when the request ends, however it ends (a client that disconnects
mid-stream included). The model is fixed when the app is built; no request names a path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, MoeLLMError
from ..runtime.engine import Engine
from ..runtime.sequence import QueueFullError
from .expert_view import ExpertView
from .metrics import prometheus_text
from .protocol import ChatCompletionRequest, CompletionRequest, UnsupportedError
from .replies import Reply, sse

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 4 * 2**20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413 before it is all read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = error_response(413, f"request body is larger than {self.limit} bytes", "invalid_request_error",
                                 code="request_too_large")  # fmt: skip
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")
            return message

        await self.app(scope, limited, send)


def _first_error(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = f"unrecognized request argument: {param}"
    return (f"{param}: {msg}" if param and not msg.startswith(("unrecognized", param)) else msg), param


BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def _openapi(app: FastAPI):
    """app.openapi with the request bodies that the handlers parse themselves (`_parse`, for
    OpenAI-style errors), taken from their pydantic models."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for path, model in BODIES.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
                ref = {"$ref": f"#/components/schemas/{model.__name__}"}
                spec["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref}},
                }
            app.openapi_schema = spec
        return app.openapi_schema

    return openapi


async def _parse(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = _first_error(exc)
        raise ApiError(422, message, param=param, code="invalid_value") from None


class Server:
    """Route handlers bound to one engine."""

    def __init__(self, engine: Engine, model_name: str | None, api_key: str | None, default_max_tokens: int):
        self.engine = engine
        self.model = model_name or engine.model_name
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.view = ExpertView.of(engine)
        self.started = time.time()
        self.errors: dict[int, int] = {}

    # -- request checks -------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")  # fmt: skip

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def max_tokens(self, value: int | None, prompt_tokens: int) -> int | None:
        ctx = self.engine.context_length
        if value is not None and value > ctx:
            raise ApiError(400, f"max_tokens is too large: {value}; the context holds {ctx} tokens",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        if prompt_tokens >= ctx:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context holds {ctx}",
                           param="messages", code="context_length_exceeded")  # fmt: skip
        return value

    async def open_stream(self, token_ids: list[int], opts: dict[str, Any]):
        """The engine stream of a validated request (queued now: 429 when the queue is full)."""
        try:
            return await asyncio.to_thread(self.engine.stream, token_ids, **opts)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), "rate_limit_error", code="queue_full") from None
        except InputError as exc:
            raise ApiError(400, str(exc)) from None

    # -- endpoints ------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "moe-llm",
                "context_length": self.engine.context_length}  # fmt: skip

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        try:
            req.refuse_unsupported()
            req.check_tool_choice()
            messages = [m.to_engine() for m in req.messages]
        except UnsupportedError as exc:
            raise ApiError(400, str(exc), param=exc.param, code="unsupported") from None
        tools = req.tool_dicts()
        rf = req.response_format
        response_format = rf.model_dump(exclude_none=True) if rf is not None and rf.type != "text" else None
        try:
            prompt = await asyncio.to_thread(
                self.engine.chat_prompt, messages, tools=tools, tool_choice=req.tool_choice,
                response_format=response_format,
            )  # fmt: skip
        except MoeLLMError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        except Exception as exc:  # the chat template refused the conversation (jinja raise_exception)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ApiError(400, f"the chat template cannot render these messages: {reason}", param="messages") from None
        max_tokens = self.max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt.token_ids))
        opts = req.options(max_tokens, self.default_max_tokens)
        opts["stop"] += [s for s in prompt.stop if s not in opts["stop"]]
        reply = Reply(self.model, "chat", len(prompt.token_ids), prompt.prefill, bool(tools), response_format)
        if prompt.complete:  # a forced call of a tool without parameters: nothing to generate
            chunks = None
        else:
            chunks = await self.open_stream(prompt.token_ids, opts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(reply.stream_chat(chunks, include_usage))
        return JSONResponse(await reply.collect_chat(chunks))

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await _parse(request, CompletionRequest)
        self.check_model(req.model)
        try:
            req.refuse_unsupported()
        except UnsupportedError as exc:
            raise ApiError(400, str(exc), param=exc.param, code="unsupported") from None
        try:
            ids = await asyncio.to_thread(self.engine.encode, req.prompt)
        except MoeLLMError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        max_tokens = self.max_tokens(req.max_tokens, len(ids))
        opts = req.options(max_tokens, min(16, self.default_max_tokens))
        reply = Reply(self.model, "text", len(ids), "", False, None)
        chunks = await self.open_stream(ids, opts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(reply.stream_text(chunks, include_usage))
        return JSONResponse(await reply.collect_text(chunks))

    def health(self) -> dict[str, Any]:
        b = self.engine.batcher
        return {"status": "ok", "model": self.model, "active_requests": b.active_requests,
                "queue_depth": b.queue_depth, "uptime_s": time.time() - self.started}  # fmt: skip

    def metrics(self) -> str:
        return prometheus_text(self.engine.stats_dict(), self.errors)


def _static(name: str) -> str:
    return resources.files("moe_llm.serve").joinpath("static", name).read_text(encoding="utf-8")


def create_app(
    engine: Engine,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    default_max_tokens: int = 512,
) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (default: the checkpoint directory's name)."""
    server = Server(engine, model_name, api_key, default_max_tokens)
    # /openapi.json describes the request bodies (parsed by `_parse`, so declared by hand); no docs pages
    app = FastAPI(title="moe-llm", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        server.errors[exc.status] = server.errors.get(exc.status, 0) + 1
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        server.errors[exc.status_code] = server.errors.get(exc.status_code, 0) + 1
        code = "not_found" if exc.status_code == 404 else None
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, str(exc.errors()[0].get("msg")), "invalid_request_error", code="invalid_value")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("request failed")
        server.errors[500] = server.errors.get(500, 0) + 1
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def v1(request: Request) -> None:
        server.authorize(request)

    @app.get("/v1/models")
    async def list_models(request: Request):
        v1(request)
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str):
        v1(request)
        server.check_model(name)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        v1(request)
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        v1(request)
        return await server.completions(request)

    @app.get("/v1/engine/experts")
    async def experts(request: Request):
        v1(request)
        return await asyncio.to_thread(server.view.state)

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return HTMLResponse(_static("index.html"))

    app.openapi = _openapi(app)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    return app
