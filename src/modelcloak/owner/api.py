"""The owner backend's HTTP API (FastAPI). Thin: validates shapes, calls OwnerService, maps refusals to 4xx.

Every answer other than success is JSON {"error": "<one line>"} with a 4xx status: 400 malformed,
401 bad signature, 403 refused by policy or evidence, 404 unknown licence, 409 sequence conflict,
413 body too large, 422 wrong shape. A 500 would be a bug; the tests fuzz for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelcloak.licensing.protocol import MAX_BATCH_QUERIES, MAX_SEQUENCE, RequestRefused
from modelcloak.owner.errors import DatabaseUnavailable, OwnerError
from modelcloak.owner.hot import HotRoutes
from modelcloak.owner.metrics import Metrics, MetricsMiddleware
from modelcloak.owner.refusals import SHUTDOWN_FLUSH_TIMEOUT
from modelcloak.owner.service import OwnerService

MAX_BODY = 256 * 1024  # evidence with a certificate chain is a few KiB; nothing legitimate is near this
# An encrypted FHE result is about 120 KiB per ciphertext (up to 64 samples at N=8192), 4/3 of that in
# base64; 16 MiB allows 100 ciphertexts per request.
FHE_MAX_BODY = 16 * 1024 * 1024
FHE_PATH = "/v1/fhe/labels"
BODY_TIMEOUT = 15.0
# Per client address. Generous: a device makes a handful of requests per minute, and a busy site
# behind one NAT address still fits; what it stops is one address flooding the backend.
DEFAULT_RATE = 2000.0
DEFAULT_BURST = 4000.0
_log = logging.getLogger("modelcloak.owner")

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
_BASE64 = Field(json_schema_extra={"contentEncoding": "base64", "format": "byte"})
B64 = Annotated[str, StringConstraints(min_length=1, max_length=MAX_BODY), _BASE64]
MacB64 = Annotated[str, StringConstraints(min_length=1, max_length=128), _BASE64]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NonceRequest(_Strict):
    licence_id: Identifier


class ReleaseRequest(_Strict):
    licence_id: Identifier
    device_id: Identifier
    instance_id: Identifier
    nonce: B64
    ephemeral_public_key: B64
    evidence_kind: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    evidence: B64


class FheLabelsRequest(_Strict):
    licence_id: Identifier
    reporter_id: Identifier
    sequence: Annotated[int, Field(ge=1, le=MAX_SEQUENCE)]
    queries: Annotated[int, Field(ge=1, le=MAX_BATCH_QUERIES)]
    mac: MacB64
    result: Annotated[str, StringConstraints(min_length=1, max_length=FHE_MAX_BODY), _BASE64]
    top_k: Annotated[int, Field(ge=1, le=1000)] = 1


class UsageRequest(_Strict):
    licence_id: Identifier
    reporter_id: Identifier
    sequence: Annotated[int, Field(ge=1, le=MAX_SEQUENCE)]
    queries: Annotated[int, Field(ge=0, le=MAX_BATCH_QUERIES)]
    mac: MacB64


class ErrorBody(BaseModel):
    error: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the refusals a route can answer (all share the {"error": ...} body)."""
    meaning = {
        400: "malformed (base64, ids, evidence that does not parse)",
        401: "signature does not verify",
        403: "refused by policy or evidence (reason given)",
        404: "unknown licence",
        409: "sequence conflict",
        413: "body too large",
        422: "wrong shape (field named)",
        429: "too many requests",
        503: "database unavailable",
    }
    return {code: {"model": ErrorBody, "description": meaning[code]} for code in (*codes, 413, 422, 429, 503)}


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRefused(f"{what} is not valid base64", 400) from None


class RateLimit:
    """Token buckets per client address: `rate` requests per second on average, bursts up to `burst`.

    Bounds what one address can make the backend do (parse, verify, audit) before anyone is
    authenticated; over the limit the answer is 429 with Retry-After, and the buckets of addresses
    that went quiet are forgotten so the table itself stays small.
    """

    def __init__(self, app: ASGIApp, *, rate: float, burst: float, on_refusal: Callable[[Scope], None]) -> None:
        self.app = app
        self.rate = rate
        self.burst = burst
        self.on_refusal = on_refusal
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, last refill)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate <= 0:
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("?",))[0]
        now = time.monotonic()
        tokens, last = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            self.on_refusal(scope)
            await _send_error(send, 429, "too many requests from this address", retry_after=1)
            return
        self._buckets[address] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget full buckets (idle addresses)
            self._buckets = {a: b for a, b in self._buckets.items() if b[0] < self.burst - 1}
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413, by Content-Length and by counting what arrives."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_BODY,
        per_path: dict[str, int] | None = None,
        on_refusal: Callable[[Scope, int], None] | None = None,
        hot: HotRoutes | None = None,
    ) -> None:
        self.app = app
        self.hot = hot
        self.on_refusal = on_refusal or (lambda _scope, _limit: None)
        self.default_limit = limit
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.default_limit)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = True
                if too_big:
                    self.on_refusal(scope, limit)
                    await _send_error(send, 413, f"request body larger than {limit} bytes")
                    return
        # Read the whole body here (bounded) and replay it: the framework turns errors raised while
        # it reads into a generic 400, and a streamed body has no Content-Length to check first.
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                # A client that sends headers and then trickles (or never sends) its body would hold a
                # connection and a buffer for ever; it gets BODY_TIMEOUT seconds for the whole body.
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT)
            except TimeoutError:
                self.on_refusal(scope, -1)
                await _send_error(send, 408, f"request body not received within {BODY_TIMEOUT:g} s")
                return
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                self.on_refusal(scope, limit)
                await _send_error(send, 413, f"request body larger than {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if self.hot is not None and self.hot.wants(scope) and await self.hot.serve(scope, body, send):
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send: Send, status: int, reason: str, *, retry_after: int | None = None) -> None:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    response = JSONResponse({"error": reason}, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(
    service: OwnerService,
    *,
    rate: float = DEFAULT_RATE,
    burst: float = DEFAULT_BURST,
    metrics_token: str | None = None,
) -> ASGIApp:
    """The API as an ASGI app: FastAPI inside a body-size limit inside a per-address rate limit (0: off),
    all inside the metrics layer (GET /metrics; `metrics_token` guards it, else loopback only)."""
    metrics = Metrics(
        ["/v1/health", "/v1/nonce", "/v1/release", "/v1/usage", FHE_PATH, "/v1/openapi.json"],
        service.licence_usage,
    )

    # As many threads as anyio's default limiter gave the sync endpoints before.
    release_pool = ThreadPoolExecutor(max_workers=40, thread_name_prefix="modelcloak-release")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # At shutdown, after the last request was answered: the refusals they audited may still be queued
        # for the background writer (owner/refusals.py), whose daemon thread dies with the process. Here,
        # not after uvicorn returns: uvicorn re-raises SIGTERM once it is done, which ends the process.
        await run_in_threadpool(service.refusals.close, SHUTDOWN_FLUSH_TIMEOUT)
        release_pool.shutdown(wait=False)

    app = FastAPI(
        lifespan=lifespan,
        title="modelcloak owner backend",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )

    def refuse(request: Request, status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        client = request.client.host if request.client else None
        service.refusals.record("http.refused", request.url.path, status=status, reason=reason, client=client)
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    def answer_exception(
        path: str, client: str | None, exc: Exception
    ) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """Status, body and headers for an exception from an endpoint; audits and logs as it goes.
        Shared by FastAPI's exception handlers and the hot routes (owner/hot.py)."""
        if isinstance(exc, RequestRefused):
            if not exc.audited:
                service.refusals.record("http.refused", path, status=exc.status, reason=str(exc), client=client)
            return exc.status, {"error": str(exc)}, None
        if isinstance(exc, DatabaseUnavailable):
            # The cause (host, port, driver message) goes to the owner's log, never to the client.
            _log.error("database unavailable on %s: %s", path, exc)
            metrics.database_errors.inc()
            return 503, {"error": "the owner backend's database is unavailable; retry later"}, {"Retry-After": "5"}
        if isinstance(exc, OwnerError):
            service.refusals.record("http.refused", path, status=400, reason=str(exc), client=client)
            return 400, {"error": str(exc)}, None
        # A bug, not bad input: logged with its traceback, audited, and answered without internals.
        _log.error("unhandled error on POST %s", path, exc_info=exc)
        service.refusals.record("http.error", path, error=type(exc).__name__, client=client)
        return 500, {"error": "internal error; the owner's log has the details"}, None

    async def _handled(request: Request, exc: Exception) -> JSONResponse:
        client = request.client.host if request.client else None
        status, payload, headers = answer_exception(request.url.path, client, exc)
        return JSONResponse(payload, status_code=status, headers=headers)

    for handled in (RequestRefused, DatabaseUnavailable, OwnerError):
        app.add_exception_handler(handled, _handled)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return refuse(request, 422, f"invalid request: {where}: {first.get('msg', 'malformed')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return refuse(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback, audited, and answered without internals.
        _log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        client = request.client.host if request.client else None
        service.refusals.record("http.error", request.url.path, error=type(exc).__name__, client=client)
        return JSONResponse({"error": "internal error; the owner's log has the details"}, status_code=500)

    @app.get("/v1/health", responses={503: {"model": ErrorBody, "description": "database unavailable"}})
    def health() -> dict[str, Any]:
        service.store.ping()  # 503 (handler above) when the database does not answer
        return {"ok": True, "database": service.store.dialect}

    # The hot routes' work, shared by their FastAPI declarations (schema, unusual requests) and by
    # owner/hot.py, which answers well-formed requests without FastAPI's per-request machinery.
    async def nonce_work(body: NonceRequest) -> dict[str, Any]:
        # A nonce for a licence this process knows costs an HMAC: made on the event loop, no thread hop.
        if service.knows_licence(body.licence_id):
            value, expires_at = service.new_nonce(body.licence_id)
        else:
            value, expires_at = await run_in_threadpool(service.new_nonce, body.licence_id)
        return {"nonce": base64.b64encode(value).decode(), "expires_at": expires_at.isoformat()}

    def release_sync(body: ReleaseRequest) -> dict[str, Any]:
        granted = service.release_key(
            licence_id=body.licence_id,
            device_id=body.device_id,
            instance_id=body.instance_id,
            nonce=_b64(body.nonce, "nonce"),
            ephemeral_public_key=_b64(body.ephemeral_public_key, "ephemeral_public_key"),
            evidence_kind=body.evidence_kind,
            evidence=_b64(body.evidence, "evidence"),
        )
        return granted.as_json()

    async def release_work(body: ReleaseRequest) -> dict[str, Any]:
        # Blocking (evidence, a synced commit): off the event loop, in a pool of its own. A plain
        # executor hop costs about 45 us of CPU against anyio's 70-80 (run_in_threadpool), measured.
        return await asyncio.get_running_loop().run_in_executor(release_pool, release_sync, body)

    async def usage_work(body: UsageRequest) -> dict[str, Any]:
        # The request waits for its group commit without holding a worker thread.
        ack = await service.report_usage_async(
            body.licence_id, body.reporter_id, body.sequence, body.queries, _b64(body.mac, "mac")
        )
        return ack.as_json()

    @app.post("/v1/nonce", responses=_errors(400, 404))
    async def nonce(body: NonceRequest) -> dict[str, Any]:
        return await nonce_work(body)

    @app.post("/v1/release", responses=_errors(400, 403, 404))
    async def release(body: ReleaseRequest) -> dict[str, Any]:
        return await release_work(body)

    @app.post("/v1/usage", responses=_errors(400, 401, 403, 404, 409))
    async def usage(body: UsageRequest) -> dict[str, Any]:
        return await usage_work(body)

    @app.post(FHE_PATH, responses=_errors(400, 401, 403, 404, 409))
    def fhe_labels(body: FheLabelsRequest) -> dict[str, Any]:
        # sync: decryption is CPU work, run in the worker pool, off the event loop.
        labels, ack = service.fhe_labels(
            body.licence_id,
            body.reporter_id,
            body.sequence,
            body.queries,
            _b64(body.mac, "mac"),
            _b64(body.result, "result"),
            top_k=body.top_k,
        )
        return {"labels": labels, **ack.as_json()}

    def body_refused(scope: Scope, limit: int) -> None:
        client = (scope.get("client") or (None,))[0]
        status = 408 if limit < 0 else 413
        service.refusals.record("http.refused", scope.get("path", ""), status=status, limit=limit, client=client)

    throttled_since_log = [0]

    def throttled(scope: Scope) -> None:
        # One audit entry per 1,000 throttled requests: a flood must not turn into an audit flood.
        throttled_since_log[0] += 1
        if throttled_since_log[0] % 1000 == 1:
            client = (scope.get("client") or (None,))[0]
            service.refusals.record("http.throttled", client or "?", status=429, every=1000)

    hot = HotRoutes(
        {
            "/v1/nonce": (NonceRequest, nonce_work),
            "/v1/release": (ReleaseRequest, release_work),
            "/v1/usage": (UsageRequest, usage_work),
        },
        answer_exception,
    )
    limited = BodyLimit(app, per_path={FHE_PATH: FHE_MAX_BODY}, on_refusal=body_refused, hot=hot)
    return MetricsMiddleware(
        RateLimit(limited, rate=rate, burst=burst, on_refusal=throttled), metrics, token=metrics_token
    )
