"""A licence pins the oldest bundle serial its devices may run (issue 15's rollback protection, owner side).

The owner issues (or later pins) a licence with `min_serial`; the key-release answer carries it, and
the device's key provider refuses a bundle whose owner-signed serial is older before the model key
leaves the provider. Against a live `modelcloak serve` on SQLite: an older signed bundle is refused
under a pin and loads without one (control); the pin needs a pinned signer (a key holder could
rewrite an unsigned number); raising the pin stops a running device at its next revalidation; and
lowering the pin by SQL is refused by the licence's integrity tag, while the owner's own change works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from models import make_mlp
from owner_backend import Backend

from modelcloak.bundle.serial import RollbackError
from modelcloak.inference import load
from modelcloak.keys import KeyProviderError
from modelcloak.licensing.client import OwnerBackendKey
from modelcloak.licensing.protocol import RequestRefused
from modelcloak.protector import protect

X = np.zeros((1, 16), np.float32)


# One live server and one pair of bundles for the module: starting `serve` is most of the cost.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("pin")
    made = Backend(str(tmp_path / "owner.db"), tmp_path)
    made.server.start()
    yield made
    made.server.stop()
    made.service.store.close()


@pytest.fixture(scope="module")
def bundles(backend: Backend) -> tuple[dict[int, Path], bytes]:
    """Bundles of serial 4 and 5 signed by the owner, and the owner's public key."""
    tmp_path = backend.tmp
    signer = Ed25519PrivateKey.generate()
    public = signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    paths = {}
    for serial in (4, 5):
        paths[serial] = tmp_path / f"v{serial}.mcb"
        protect(make_mlp(), paths[serial], key=backend.model_key_file, signer=signer, serial=serial)
    return paths, public


def _provider(backend: Backend, licence: str) -> OwnerBackendKey:
    return OwnerBackendKey(backend.server.url, licence_id=licence, device_id="dev1", attester=backend.attester)


def test_a_licence_pinning_serial_5_refuses_an_older_signed_bundle(backend: Backend, bundles) -> None:
    paths, public = bundles
    pinned = backend.licence(min_serial=5)
    provider = _provider(backend, pinned)
    with load(paths[5], key=provider, trusted_signers=[public]) as session:
        assert session.run(X)["logits"].shape == (1, 10)
    assert provider.terms["min_serial"] == 5
    with pytest.raises(RollbackError, match=f"licence {pinned} pins serial 5: the bundle has serial 4, older"):
        load(paths[4], key=_provider(backend, pinned), trusted_signers=[public])
    # Without a pinned signer the serial proves nothing (the device holds the key that MACs the manifest).
    with pytest.raises(RollbackError, match="needs a pinned owner signature"):
        load(paths[5], key=_provider(backend, pinned))
    # Control: the same older bundle under a licence without a pin loads; the pin is what refused it.
    free = backend.licence()
    with load(paths[4], key=_provider(backend, free), trusted_signers=[public]) as session:
        assert session.run(X)["logits"].shape == (1, 10)
    assert backend.service.licences()[-1]["min_serial"] is None


def test_raising_the_pin_stops_a_running_device_at_revalidation(backend: Backend, bundles) -> None:
    paths, public = bundles
    licence = backend.licence(min_serial=4)
    provider = _provider(backend, licence)
    with load(paths[4], key=provider, trusted_signers=[public]):
        due = provider._deadline("revalidate_at")
        assert provider.revalidate(due) is True  # control: same pin, revalidation passes
        backend.service.pin_serial(licence, 5)
        with pytest.raises(RequestRefused, match="pins serial 5: the bundle has serial 4"):
            provider.revalidate(provider._deadline("revalidate_at"))


def test_lowering_a_pin_by_sql_is_refused_and_the_owners_change_works(backend: Backend, bundles) -> None:
    paths, public = bundles
    licence = backend.licence(min_serial=5)
    for forged in ("NULL", "3"):
        with backend.service.store.engine.begin() as connection:
            connection.exec_driver_sql(f"UPDATE licences SET min_serial = {forged} WHERE id = '{licence}'")
        with pytest.raises(KeyProviderError, match="failed its integrity check"):
            load(paths[4], key=_provider(backend, licence), trusted_signers=[public])
    with backend.service.store.engine.begin() as connection:  # put the genuine value back
        connection.exec_driver_sql(f"UPDATE licences SET min_serial = 5 WHERE id = '{licence}'")
    with pytest.raises(RollbackError):
        load(paths[4], key=_provider(backend, licence), trusted_signers=[public])
    backend.service.pin_serial(licence, None)  # the owner's own change is re-tagged
    with load(paths[4], key=_provider(backend, licence), trusted_signers=[public]) as session:
        assert session.run(X)["logits"].shape == (1, 10)


def test_invalid_pins_are_refused(backend: Backend) -> None:
    for bad in (-1, 2**60, True, "5"):
        with pytest.raises(RequestRefused, match="minimum serial must be an integer"):
            backend.licence(min_serial=bad)
