"""The hot routes (nonce, key release, usage report) answered without FastAPI's per-request machinery.

FastAPI costs about as much per request as the work behind these routes (its Request object, the
dependency solver, an exit stack, response-model serialisation, the exception middlewares). Here a
well-formed request goes straight from the body the body limit has already read to the same
pydantic model and the same endpoint function. Anything unusual (another content type, JSON that
does not parse, a body the model refuses) is declined and handed to FastAPI unchanged, so malformed
input gets exactly the answer and audit entry it got before; FastAPI also still declares these
routes, so the OpenAPI schema does not change. Exceptions from the endpoint go through the same
mapping as FastAPI's exception handlers (`api.create_app`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.types import Scope, Send

# path -> (request model, endpoint taking the validated model and answering a JSON-able dict)
Endpoint = Callable[[Any], Awaitable[dict[str, Any]]]
# (path, client address, exception) -> (status, JSON body, extra headers)
ExceptionAnswer = Callable[[str, str | None, Exception], tuple[int, dict[str, Any], dict[str, str] | None]]
_JSON = b"application/json"


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == _JSON
    return False


def encode(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[list, bytes]:
    """Headers and body as Starlette's JSONResponse makes them (same bytes, same header order)."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    raw += [(b"content-length", str(len(body)).encode()), (b"content-type", _JSON)]
    return raw, body


class HotRoutes:
    """POST routes served directly when the request is well-formed; `serve` returns False to decline."""

    def __init__(self, routes: dict[str, tuple[type[BaseModel], Endpoint]], answer: ExceptionAnswer) -> None:
        self.routes = routes
        self.answer = answer

    def wants(self, scope: Scope) -> bool:
        return scope["path"] in self.routes and scope["method"] == "POST"

    async def serve(self, scope: Scope, body: bytes, send: Send) -> bool:
        model, endpoint = self.routes[scope["path"]]
        if not body or not _is_json(scope):
            return False
        try:
            # json.loads and a python-mode validation: what FastAPI does with the same body, so the
            # two accept exactly the same requests.
            parsed = json.loads(body)
            if not isinstance(parsed, dict):
                return False
            request = model.model_validate(parsed)
        except (ValueError, ValidationError, RecursionError):
            return False  # FastAPI answers it (4xx, audited), as it always did
        try:
            status, payload, headers = 200, await endpoint(request), None
        except Exception as exc:
            client = (scope.get("client") or (None,))[0]
            status, payload, headers = self.answer(scope["path"], client, exc)
        raw, encoded = encode(status, payload, headers)
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": encoded})
        return True
