"""The decryption service of the fhe scheme in `modelcloak serve`: labels only, authenticated per device,
metered like usage, refusing tampered, foreign and malformed ciphertexts with a 4xx (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from models import make_mlp, reference_outputs
from postgres import database_fixture, postgres_cluster_fixture  # noqa: F401  (fixtures "database", "postgres_cluster")
from test_owner_api import Backend

pytest.importorskip("tenseal")

from modelcloak.inference import load  # noqa: E402
from modelcloak.licensing.client import FheLabelClient  # noqa: E402
from modelcloak.licensing.protocol import RequestRefused, fhe_request_mac  # noqa: E402
from modelcloak.protector import protect  # noqa: E402


class FheWorld:
    def __init__(self, backend: Backend, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.model = make_mlp(sizes=(16, 64, 10), seed=7)
        self.bundle = tmp / "head.mcb"
        protect(
            self.model,
            self.bundle,
            key=backend.model_key_file,
            scheme="fhe",
            cut={"last": 1},
            fhe={"secret_out": tmp / "owner.fhe"},
        )
        backend.service.register_fhe_secret("mnist", (tmp / "owner.fhe").read_bytes())

    def inputs(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Inputs whose top two logits are far apart (CKKS noise cannot swap them) and their labels."""
        x = np.random.default_rng(seed).standard_normal((4 * n, 16)).astype(np.float32)
        logits = reference_outputs(self.model, x)
        top2 = np.sort(logits, axis=1)[:, -2:]
        keep = (top2[:, 1] - top2[:, 0]) > 1e-2
        return x[keep][:n], logits[keep][:n].argmax(axis=1)

    def result(self, x: np.ndarray) -> bytes:
        with load(self.bundle, key=self.backend.model_key_file) as session:
            return session.evaluate({"x": x})

    def labeller(self, licence: str, reporter: str = "fhe-1") -> FheLabelClient:
        return FheLabelClient(
            self.backend.client(),
            licence_id=licence,
            reporter_id=reporter,
            usage_key=self.backend.usage_key(licence),
            state_path=self.tmp / f"{licence}-{reporter}.state",
        )


@pytest.fixture
def world(database: str, tmp_path: Path):
    backend = Backend(database, tmp_path)
    backend.server.start()
    yield FheWorld(backend, tmp_path)
    backend.server.stop()
    backend.service.store.close()


def test_the_device_gets_labels_and_each_request_is_counted_once(world: FheWorld) -> None:
    licence = world.backend.licence(query_quota=1000)
    x, expected = world.inputs(12)
    labeller = world.labeller(licence)
    assert labeller.labels(world.result(x), queries=len(x)) == expected.tolist()
    assert world.backend.service.queries_used(licence) == 12

    # A resend of an acknowledged request (a lost answer) gets its labels again, not counted twice.
    result = world.result(x[:5])
    sequence = labeller.next_sequence
    first = labeller.labels(result, queries=5)
    labeller._state["next"] = sequence  # as if the answer had been lost before the state was saved
    assert labeller.labels(result, queries=5) == first == expected[:5].tolist()
    assert world.backend.service.queries_used(licence) == 17

    top = world.labeller(licence, "fhe-topk").labels(world.result(x[:3]), queries=3, top_k=3)
    assert [row[0] for row in top] == expected[:3].tolist() and all(len(row) == 3 for row in top)


def _post(world: FheWorld, licence: str, usage_key: bytes, result: bytes, *, queries: int, sequence: int = 1,
          mac_over: bytes | None = None, reporter: str = "raw") -> httpx.Response:  # fmt: skip
    mac = fhe_request_mac(usage_key, licence, reporter, sequence, queries, result if mac_over is None else mac_over)
    body = {
        "licence_id": licence,
        "reporter_id": reporter,
        "sequence": sequence,
        "queries": queries,
        "mac": base64.b64encode(mac).decode(),
        "result": base64.b64encode(result).decode(),
    }
    return httpx.post(world.backend.server.url + "/v1/fhe/labels", json=body, timeout=30)


def test_tampered_swapped_and_foreign_results_are_refused_and_not_counted(world: FheWorld) -> None:
    licence = world.backend.licence(query_quota=1000)
    key = world.backend.usage_key(licence)
    x, _ = world.inputs(4)
    result = bytearray(world.result(x))

    # Swapped in transit: the MAC covers the result it was made for.
    other = world.result(world.inputs(4, seed=3)[0])
    answer = _post(world, licence, key, bytes(result), queries=4, mac_over=other)
    assert answer.status_code == 401, answer.text

    # Tampered by the device itself (MAC made over the tampered bytes): the envelope's digest catches it.
    tampered = bytearray(result)
    tampered[len(tampered) // 2] ^= 0x40
    answer = _post(world, licence, key, bytes(tampered), queries=4)
    assert answer.status_code == 422, answer.text

    # A result from another FHE model (another bundle's parameters and keys).
    stranger = world.tmp / "stranger"
    stranger.mkdir()
    protect(make_mlp(sizes=(16, 64, 10), seed=8), stranger / "b.mcb", key=world.backend.model_key_file,
            scheme="fhe", cut={"last": 1}, fhe={"secret_out": stranger / "s.fhe"})  # fmt: skip
    with load(stranger / "b.mcb", key=world.backend.model_key_file) as session:
        foreign = session.evaluate({"x": x})
    answer = _post(world, licence, key, foreign, queries=4)
    assert answer.status_code == 422 and "model" in answer.json()["error"], answer.text

    # The wrong sample count, garbage bytes, bad base64: 4xx, never 5xx.
    assert _post(world, licence, key, bytes(result), queries=5).status_code == 400
    assert _post(world, licence, key, b"not a result", queries=1).status_code == 422
    garbage = {"licence_id": licence, "reporter_id": "r", "sequence": 1, "queries": 1, "mac": "AA==", "result": "%%"}
    assert httpx.post(world.backend.server.url + "/v1/fhe/labels", json=garbage).status_code in (400, 401)
    assert world.backend.service.queries_used(licence) == 0

    # The control: the untouched result with its own MAC is answered and counted, with labels only.
    answer = _post(world, licence, key, bytes(result), queries=4)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["labels"]) == 4 and not {"logits", "scores", "values"} & set(answer.json())
    assert world.backend.service.queries_used(licence) == 4


def test_quota_revocation_and_size_limits(world: FheWorld) -> None:
    x, expected = world.inputs(6)
    small = world.backend.licence(query_quota=5)
    with pytest.raises(RequestRefused, match="quota"):
        world.labeller(small).labels(world.result(x), queries=6)
    assert world.backend.service.queries_used(small) == 0

    licence = world.backend.licence()
    labeller = world.labeller(licence)
    assert labeller.labels(world.result(x), queries=6) == expected.tolist()
    world.backend.service.revoke_licence(licence, "contract ended")
    with pytest.raises(RequestRefused, match="revoked: contract ended"):
        labeller.labels(world.result(x), queries=6)

    huge = {"licence_id": licence, "reporter_id": "r", "sequence": 1, "queries": 1, "mac": "AA==",
            "result": "A" * (17 * 1024 * 1024)}  # fmt: skip
    assert httpx.post(world.backend.server.url + "/v1/fhe/labels", json=huge, timeout=60).status_code == 413


def test_concurrent_devices_get_their_own_labels_and_exact_totals(world: FheWorld) -> None:
    licence = world.backend.licence(query_quota=10_000)
    jobs = []
    for worker in range(4):
        x, expected = world.inputs(5 + worker, seed=10 + worker)
        jobs.append((world.labeller(licence, f"fhe-{worker}"), world.result(x), expected))
    answers: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        labeller, result, expected = jobs[index]
        try:
            for _ in range(3):
                answers.setdefault(index, []).extend(labeller.labels(result, queries=len(expected)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for index, (_, _, expected) in enumerate(jobs):
        assert answers[index] == expected.tolist() * 3
    assert world.backend.service.queries_used(licence) == 3 * sum(len(e) for _, _, e in jobs)
