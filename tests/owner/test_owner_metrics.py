"""GET /metrics on a real `modelcloak serve` process: counts that follow what happened, guarded by a token."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
from owner_backend import Backend, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from modelcloak.licensing.client import OwnerClient, UsageReporter


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_refusals_latency_and_usage_and_need_the_token(tmp_path: Path) -> None:
    backend = Backend(str(tmp_path / "owner.db"), tmp_path)
    backend.server = server = ServerProcess(
        backend.server.database, backend.master_file, tmp_path / "server.log", env={"MODELCLOAK_METRICS_TOKEN": "t0k"}
    )
    server.start()
    try:
        licence = backend.licence(query_quota=1000)
        usage_key = backend.usage_key(licence)
        with OwnerClient(server.url) as client:
            reporter = UsageReporter(
                client, licence_id=licence, reporter_id="r1", usage_key=usage_key, state_path=tmp_path / "r1.json"
            )
            reporter.report(7)
        forged = {
            "licence_id": licence,
            "reporter_id": "r2",
            "sequence": 1,
            "queries": 5,
            "mac": base64.b64encode(b"\0" * 32).decode(),
        }
        assert httpx.post(server.url + "/v1/usage", json=forged).status_code == 401
        assert httpx.get(server.url + "/no/such/path/" + "x" * 50).status_code == 404

        # Without the token, or with a wrong one, nothing is disclosed.
        assert httpx.get(server.url + "/metrics").status_code == 403
        wrong = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer t0k-not"})
        assert wrong.status_code == 403 and "modelcloak_" not in wrong.text
        answer = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer t0k"})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        samples = _samples(answer.text)
    finally:
        server.stop()
        backend.service.store.close()

    assert samples[("modelcloak_licence_queries_total", (("licence", licence),))] == 7
    assert samples[("modelcloak_licence_query_quota", (("licence", licence),))] == 1000
    usage = (("method", "POST"), ("route", "/v1/usage"))
    assert samples[("modelcloak_http_requests_total", (*usage[:1], ("route", "/v1/usage"), ("status", "200")))] == 1
    assert samples[("modelcloak_http_requests_total", (*usage[:1], ("route", "/v1/usage"), ("status", "401")))] == 1
    assert samples[("modelcloak_refusals_total", (("reason", "bad_signature"), ("route", "/v1/usage")))] == 1
    assert samples[("modelcloak_refusals_total", (("reason", "unknown_licence"), ("route", "other")))] == 1
    assert samples[("modelcloak_http_request_duration_seconds_count", (("route", "/v1/usage"),))] == 2
    releases = samples[("modelcloak_http_request_duration_seconds_count", (("route", "/v1/release"),))]
    assert releases == 1  # backend.usage_key() released the key through this server
    # The two refused metrics scrapes are counted too, and junk paths never become labels.
    assert samples[("modelcloak_refusals_total", (("reason", "refused_by_policy"), ("route", "/metrics")))] == 2
    assert not any("/no/such" in value for _name, labels in samples for _key, value in labels)
