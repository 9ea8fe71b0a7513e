"""The decryption service of the fhe scheme in `modelcloak serve`: labels only, authenticated per device,
metered like usage, refusing tampered, foreign and malformed ciphertexts with a 4xx (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from models import make_mlp, reference_outputs
from postgres import database_fixture, postgres_cluster_fixture  # noqa: F401  (fixtures "database", "postgres_cluster")
from test_owner_api import Backend

pytest.importorskip("tenseal")

from modelcloak.fhe.ckks import load_object, save_object  # noqa: E402
from modelcloak.fhe.engine import MAGIC_RESULT, _pack, _unpack  # noqa: E402
from modelcloak.inference import load  # noqa: E402
from modelcloak.licensing.client import FheLabelClient  # noqa: E402
from modelcloak.licensing.protocol import FHE_RESULT_REFUSED, RequestRefused, fhe_request_mac  # noqa: E402
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


def _refusal_causes(world: FheWorld, licence: str) -> list[str]:
    """What the owner's audit log says about the refused results (the device never sees this)."""
    from sqlalchemy import select

    from modelcloak.owner.store import AuditEntry

    with world.backend.service.store.transaction() as session:
        rows = session.scalars(
            select(AuditEntry).where(AuditEntry.event == "fhe.refused", AuditEntry.subject == licence)
        ).all()
        return [json.loads(row.detail)["cause"] for row in rows]


def test_every_refused_result_gets_the_same_answer_and_is_counted(world: FheWorld) -> None:
    licence = world.backend.licence(query_quota=1000)
    key = world.backend.usage_key(licence)
    x, _ = world.inputs(4)
    result = world.result(x)
    with load(world.bundle, key=world.backend.model_key_file) as session:
        evaluator = session.evaluator

    # Swapped in transit: the MAC covers the result it was made for. Unauthenticated, so not
    # counted (nobody may spend a licence's quota without its key), and it says nothing of the result.
    other = world.result(world.inputs(4, seed=3)[0])
    answer = _post(world, licence, key, result, queries=4, mac_over=other)
    assert answer.status_code == 401, answer.text
    assert world.backend.service.queries_used(licence) == 0

    stranger = world.tmp / "stranger"
    stranger.mkdir()
    protect(make_mlp(sizes=(16, 64, 10), seed=8), stranger / "b.mcb", key=world.backend.model_key_file,
            scheme="fhe", cut={"last": 1}, fhe={"secret_out": stranger / "s.fhe"})  # fmt: skip
    with load(stranger / "b.mcb", key=world.backend.model_key_file) as session:
        foreign = session.evaluate({"x": x})
    tampered = bytearray(result)
    tampered[len(tampered) // 2] ^= 0x40
    header, blobs = _unpack(MAGIC_RESULT, result, "result")
    forged = evaluator.ctx.sealapi.Ciphertext()  # the device encrypts values of its choice under the public key
    evaluator._encryptor.encrypt(evaluator.ctx.encode(np.ones(evaluator.ctx.slots), 0, evaluator._final_scale), forged)
    forged_blob = save_object(forged)
    forged_result = _pack(MAGIC_RESULT, header | {"digest": hashlib.sha256(forged_blob).hexdigest()}, [forged_blob])
    shifted = evaluator.ctx.sealapi.Ciphertext()
    evaluator._encryptor.encrypt(evaluator.ctx.encode(np.full(evaluator.ctx.slots, 0.5), 0, evaluator._final_scale),
                                 shifted)  # fmt: skip
    genuine = load_object("Ciphertext", evaluator.ctx.context, blobs[0], "result")
    evaluator.ctx.evaluator.add_inplace(genuine, shifted)  # every class of every sample moved by 0.5
    moved_blob = save_object(genuine)
    moved = _pack(MAGIC_RESULT, header | {"digest": hashlib.sha256(moved_blob).hexdigest()}, [moved_blob])

    probes = [  # (result, queries): a different cause each
        (foreign, 4),  # another model's result
        (bytes(tampered), 4),  # a flipped byte: digest mismatch
        (result, 5),  # the wrong sample count
        (b"not a result", 1),  # garbage
        (forged_result, 4),  # the device's own ciphertext: check rows wrong
        (moved, 4),  # the genuine result plus a shift: check rows wrong
    ]
    answers = []
    for sequence, (probe, queries) in enumerate(probes, start=1):
        answer = _post(world, licence, key, probe, queries=queries, sequence=sequence)
        answers.append((answer.status_code, answer.content))
    assert len(set(answers)) == 1 and answers[0][0] == 422, answers  # byte-identical answers
    assert json.loads(answers[0][1]) == {"error": FHE_RESULT_REFUSED}
    assert world.backend.service.queries_used(licence) == sum(q for _, q in probes)  # all counted
    # Negative control for the test itself: the probes really hit six different checks.
    causes = _refusal_causes(world, licence)
    assert len(causes) == len(probes) and len(set(causes)) == len(probes), causes

    # A resend of a refused request is answered the same and not counted twice; another result
    # under a used sequence is not a resend (refused before decrypting, not counted).
    assert _post(world, licence, key, moved, queries=4, sequence=6).content == answers[0][1]
    assert _post(world, licence, key, result, queries=4, sequence=6).status_code == 409
    assert world.backend.service.queries_used(licence) == sum(q for _, q in probes)

    # The control: the untouched result with its own MAC is answered and counted, with labels only.
    answer = _post(world, licence, key, result, queries=4, sequence=7)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["labels"]) == 4 and not {"logits", "scores", "values"} & set(answer.json())
    assert world.backend.service.queries_used(licence) == sum(q for _, q in probes) + 4

    # The device's client knows a counted refusal used its sequence number and carries on.
    labeller = world.labeller(licence, "client")
    with pytest.raises(RequestRefused, match="refused"):
        labeller.labels(moved, queries=4)
    assert labeller.next_sequence == 2
    assert labeller.labels(result, queries=4) == answer.json()["labels"]


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


def test_cli_run_gets_labels_from_the_owner(world: FheWorld) -> None:
    """`modelcloak run BUNDLE X --owner-url ... --fhe-labels labels.json`: the whole device side in one command."""
    import subprocess
    import sys

    from test_owner_api import MEASUREMENT

    tmp = world.tmp
    x, expected = world.inputs(6)
    np.save(tmp / "x.npy", x)
    licence = world.backend.licence(query_quota=1000)
    measurement = [f"--measurement={name}={value}" for name, value in MEASUREMENT.items()]
    command = [sys.executable, "-m", "modelcloak", "run", "--allow-unsigned", str(world.bundle), str(tmp / "x.npy"),
               "--owner-url", world.backend.server.url, "--licence", licence, "--device-id", "dev1",
               "--attest", "sim", "--sim-key", str(tmp / "device.pem"), *measurement,
               "--usage-state", str(tmp / "usage.json"), "--fhe-labels", str(tmp / "labels.json"),
               "--fhe-result", str(tmp / "result.fhe")]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    written = json.loads((tmp / "labels.json").read_text())
    assert written == {"labels": expected.tolist(), "samples": 6, "top_k": 1}
    assert world.backend.service.queries_used(licence) == 6
    assert (tmp / "result.fhe").stat().st_size > 0

    # Without the owner backend there is nobody to ask: one line, exit 2.
    alone = [sys.executable, "-m", "modelcloak", "run", "--allow-unsigned", str(world.bundle), str(tmp / "x.npy"),
             "--key-file", str(world.backend.model_key_file.path), "--fhe-labels", str(tmp / "l2.json")]  # fmt: skip
    refused = subprocess.run(alone, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--fhe-labels asks the owner backend" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp / "l2.json").exists()
