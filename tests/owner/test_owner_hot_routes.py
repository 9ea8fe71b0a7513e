"""The hot routes (owner/hot.py) answer exactly as FastAPI does, and do answer the well-formed requests.

Each request is sent twice: once as `application/json`, which the hot routes take when the body is
well-formed, and once as `application/vnd.modelcloak+json`, which they decline, so FastAPI answers
it as before. Status, body, headers and the audit entries must be the same both ways; a spy on
`HotRoutes.serve` shows which requests the hot routes answered (the control: without it, a hot path
that declined everything would pass the comparison).
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import pytest
from owner_backend import MEASUREMENT, release_body
from sqlalchemy import select
from starlette.testclient import TestClient

from modelcloak.licensing.protocol import HPKE_SUITE, release_info, usage_mac
from modelcloak.owner.api import create_app
from modelcloak.owner.evidence.sim import SimDevice
from modelcloak.owner.hot import HotRoutes
from modelcloak.owner.service import OwnerService
from modelcloak.owner.store import AuditEntry, MasterKey, Store

HOT = "application/json"
VIA_FASTAPI = "application/vnd.modelcloak+json"


@pytest.fixture
def owner(tmp_path: Path):
    service = OwnerService(Store(str(tmp_path / "owner.db")), MasterKey(secrets.token_bytes(32)))
    model_key = secrets.token_bytes(32)
    service.register_model("m", model_key)
    device = SimDevice.create(tmp_path / "dev1.pem")
    service.enroll_device("dev1", "sim", MEASUREMENT, identity=device.identity)
    licence = service.issue_licence("m", device_id="dev1", allow_sim=True)
    answered: list[str] = []  # paths the hot routes answered themselves
    serve = HotRoutes.serve

    async def spy(self: HotRoutes, scope, body, send) -> bool:
        taken = await serve(self, scope, body, send)
        if taken:
            answered.append(scope["path"])
        return taken

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HotRoutes, "serve", spy)
        with TestClient(create_app(service, rate=0), raise_server_exceptions=False) as client:
            yield service, client, device, licence, model_key, answered
    service.refusals.close()
    service.store.close()


def _audit(service: OwnerService) -> list[tuple[str, str, str, dict]]:
    service.refusals.flush()
    with service.store.transaction() as session:
        rows = session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars().all()
        entries = [(row.event, row.subject, row.outcome, json.loads(row.detail)) for row in rows]
    return [(event, subject, outcome, detail) for event, subject, outcome, detail in entries]


def _post(client: TestClient, path: str, body: object, content_type: str):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"content-type": content_type})


def _same_both_ways(owner, path: str, body: object, *, expect_hot: bool) -> int:
    service, client, *_, answered = owner
    results = []
    for content_type in (HOT, VIA_FASTAPI):
        answered.clear()
        before = len(_audit(service))
        response = _post(client, path, body, content_type)
        added = _audit(service)[before:]
        headers = {name: response.headers.get(name) for name in ("content-type", "content-length", "retry-after")}
        results.append((response.status_code, response.content, headers, added, bool(answered)))
    (hot_status, hot_body, hot_headers, hot_audit, hot_taken), (status, content, headers, audit, taken) = results
    assert not taken  # FastAPI answered the second one
    assert hot_taken == expect_hot, (path, body)
    assert (hot_status, hot_body, hot_headers) == (status, content, headers)
    assert [entry[:3] for entry in hot_audit] == [entry[:3] for entry in audit]
    assert [entry[3] for entry in hot_audit] == [entry[3] for entry in audit]
    return hot_status


def test_refusals_read_the_same_from_the_hot_routes_and_from_fastapi(owner) -> None:
    _, _, _, licence, *_ = owner
    usage = {"licence_id": licence, "reporter_id": "r1", "sequence": 1, "queries": 3, "mac": "AAAA"}
    # Well-formed requests refused by the service: the hot routes answer them (same 4xx, same audit).
    assert _same_both_ways(owner, "/v1/nonce", {"licence_id": "nobody"}, expect_hot=True) == 404
    assert _same_both_ways(owner, "/v1/usage", usage, expect_hot=True) == 401
    assert _same_both_ways(owner, "/v1/usage", {**usage, "mac": "not base64!"}, expect_hot=True) == 400
    release = {
        "licence_id": licence,
        "device_id": "dev1",
        "instance_id": "i1",
        "nonce": base64.b64encode(b"\0" * 40).decode(),
        "ephemeral_public_key": base64.b64encode(b"\1" * 32).decode(),
        "evidence_kind": "sim",
        "evidence": "AAAA",
    }
    assert _same_both_ways(owner, "/v1/release", release, expect_hot=True) in (400, 403)
    # Malformed ones: declined by the hot routes, answered by FastAPI (422/400, audited) as before.
    assert _same_both_ways(owner, "/v1/usage", {**usage, "sequence": 0}, expect_hot=False) == 422
    assert _same_both_ways(owner, "/v1/usage", {**usage, "extra": 1}, expect_hot=False) == 422
    assert _same_both_ways(owner, "/v1/nonce", b'{"licence_id": ', expect_hot=False) == 422
    assert _same_both_ways(owner, "/v1/nonce", [1, 2], expect_hot=False) == 422
    assert _same_both_ways(owner, "/v1/nonce", b"[" * 100_000, expect_hot=False) == 400  # too deep to parse


def test_a_key_release_and_a_usage_report_through_the_hot_routes(owner) -> None:
    service, client, device, licence, model_key, answered = owner
    nonce_answer = client.post("/v1/nonce", json={"licence_id": licence})
    assert nonce_answer.status_code == 200 and nonce_answer.headers["content-type"] == "application/json"
    nonce = base64.b64decode(nonce_answer.json()["nonce"])
    body, ephemeral = release_body(device, licence, nonce)
    granted = client.post("/v1/release", json=body)
    assert granted.status_code == 200, granted.text
    plain = HPKE_SUITE.decrypt(
        base64.b64decode(granted.json()["wrapped_key"]), ephemeral, info=release_info(licence, nonce)
    )
    assert plain[:32] == model_key
    replayed = client.post("/v1/release", json=body)  # the same nonce again: refused, as always
    assert replayed.status_code == 403, replayed.text
    mac = usage_mac(plain[32:], licence, "r1", 1, 7)
    report = {"licence_id": licence, "reporter_id": "r1", "sequence": 1, "queries": 7}
    acked = client.post("/v1/usage", json={**report, "mac": base64.b64encode(mac).decode()})
    assert acked.status_code == 200, acked.text
    assert service.queries_used(licence) == 7
    assert answered == ["/v1/nonce", "/v1/release", "/v1/release", "/v1/usage"]
    # The next report through FastAPI: an answer of the same shape and encoding.
    mac = usage_mac(plain[32:], licence, "r1", 2, 5)
    second = _post(
        client, "/v1/usage", {**report, "sequence": 2, "queries": 5, "mac": base64.b64encode(mac).decode()}, VIA_FASTAPI
    )
    assert second.status_code == 200 and len(answered) == 4, second.text
    assert second.json() == {**acked.json(), "acknowledged": 2, "queries_used": 12}
    assert b" " not in acked.content and b" " not in second.content  # both compact JSON
    # A GET on a hot path is FastAPI's: 405 with Allow, as the schema says.
    wrong_method = client.get("/v1/usage")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
