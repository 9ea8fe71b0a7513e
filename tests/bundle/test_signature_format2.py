"""Bundle format 2: owner signatures over BLAKE3 digests, hashed while the sections are decrypted.

The attacker here holds the model key (every `seal` device does) but not the owner's signing key:
it can re-encrypt sections, rewrite the manifest and recompute the header MAC, so only the owner
signature can refuse its work. Each attack has its control: the forgery passes everything but the
signature (header MAC, every AEAD tag), and the genuine bundle goes through the same spies to a
working session. Format 1 bundles (SHA-256, verified before anything is decrypted) must behave
exactly as before, so most tests run on both versions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelcloak import hygiene
from modelcloak.bundle import (
    Bundle,
    BundleError,
    ManifestError,
    SectionSource,
    SignatureError,
    TamperedError,
    signing,
    stream,
    write_bundle,
)
from modelcloak.bundle.manifest import canonical_json
from modelcloak.inference import load
from modelcloak.protector import protect
from modelcloak.runtime import session as session_module

CHUNK = 4096  # several chunks per section, so the hashing pipeline runs more than one batch
_PREFIX = struct.Struct(">8sHI")


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def flip_first_float(plain: bytearray) -> None:
    (value,) = struct.unpack_from("<f", plain, 0)
    struct.pack_into("<f", plain, 0, value + 1000.0)


def break_graph(plain: bytearray) -> None:
    plain[: min(len(plain), 64)] = b"\xff" * min(len(plain), 64)  # no longer a valid ONNX protobuf


def plaintexts(path: Path, key_file) -> dict[str, bytearray]:
    """Every section as the model key alone opens it (header MAC and AEAD checked, no signature)."""
    with Bundle.open(path) as bundle:
        master = key_file.key_for(bundle.manifest.key)
        try:
            bundle.check_key(master.view())
            out = {}
            for entry in bundle.manifest.sections:
                out[entry.name] = bytearray(entry.size)
                bundle.decrypt_section_into(entry.name, master.view(), memoryview(out[entry.name]))
        finally:
            master.close()
    return out


def decrypted_weights(bundle: Bundle, key_file) -> bytearray:
    """The weights section decrypted with no signature check of its own (the test checks around it)."""
    master = key_file.key_for(bundle.manifest.key)
    try:
        out = bytearray(bundle.manifest.section("weights").size)
        bundle.decrypt_section_into("weights", master.view(), memoryview(out))
    finally:
        master.close()
    return out


def forge(
    path: Path,
    key_file,
    out: Path,
    *,
    change: dict[str, Callable[[bytearray], None]] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    version: int | None = None,
    resign: Ed25519PrivateKey | None = None,
) -> Path:
    """What a key holder can do: rewrite the manifest (and the header's version), re-MAC the header,
    change section plaintext and re-encrypt every section under the new header. The owner's trailer
    is kept as it was, unless `resign` (the owner's key, for controls) signs the result anew."""
    sections = plaintexts(path, key_file)
    with Bundle.open(path) as bundle:
        document = json.loads(bundle.manifest.to_bytes())
        version = bundle.manifest.format_version if version is None else version
        manifest_key, salt, chunk = bundle.manifest.key, bundle.manifest.salt, bundle.manifest.chunk_size
        trailer = path.read_bytes()[-signing.TRAILER_SIZE :]
    for name, fn in (change or {}).items():
        fn(sections[name])
    if edit is not None:
        edit(document)
    document["format_version"] = version
    manifest_bytes = canonical_json(document)
    header = _PREFIX.pack(b"\x89MCLOAK\n", version, len(manifest_bytes)) + manifest_bytes
    master = key_file.key_for(manifest_key)
    try:
        mac = hmac.new(stream.derive(master.view(), salt, "header-mac"), header, hashlib.sha256).digest()
        body, digests = [], []
        for index, (name, plain) in enumerate(sections.items()):
            key = stream.derive(master.view(), salt, "section/" + name)
            sealed = b"".join(
                stream.encrypt_section(key, hashlib.sha256(header).digest(), index, len(plain), [bytes(plain)], chunk)
            )
            body.append(sealed)
            digest = signing.new_digest(version)
            digest.update(sealed)
            digests.append(digest.digest())
    finally:
        master.close()
    if resign is not None:
        header_digest = signing.new_digest(version)
        header_digest.update(header + mac)
        trailer = signing.make_trailer(resign, signing.signed_message(header_digest.digest(), digests, version))
    out.write_bytes(header + mac + b"".join(body) + trailer)
    return out


@pytest.fixture(autouse=True)
def small_batches(monkeypatch) -> None:
    """Three chunks per hashing batch: the small test model then runs the double buffer many times."""
    monkeypatch.setattr(stream, "_BATCH_BYTES", 3 * (CHUNK + stream.TAG_SIZE))


@pytest.fixture
def owner() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(params=[2, 1], ids=["format2", "format1"])
def signed(request, tmp_path, mlp, key_file, owner) -> Path:
    path = tmp_path / f"signed-v{request.param}.mcb"
    protect(mlp, path, key=key_file, signer=owner, chunk_size=CHUNK, format_version=request.param)
    return path


@pytest.fixture
def spies(monkeypatch) -> dict[str, list]:
    """Record every guarded buffer the load allocates, every graph it parses, every backend it builds."""
    seen: dict[str, list] = {"buffers": [], "parsed": [], "backends": []}
    real_buffer, real_parse, real_backend = (
        hygiene.weights_buffer,
        session_module._parse_graph,
        session_module.OrtBackend,
    )

    def weights_buffer(size: int) -> hygiene.SecureBuffer:
        buffer = real_buffer(size)
        seen["buffers"].append(buffer)
        return buffer

    def parse(view):
        seen["parsed"].append(len(view))
        return real_parse(view)

    def backend(*args, **kwargs):
        seen["backends"].append(args[0])
        return real_backend(*args, **kwargs)

    monkeypatch.setattr(hygiene, "weights_buffer", weights_buffer)
    monkeypatch.setattr(session_module, "_parse_graph", parse)
    monkeypatch.setattr(session_module, "OrtBackend", backend)
    return seen


def run_genuine(path: Path, key_file, owner, spies) -> None:
    """The control every refusal is paired with: the untouched bundle loads through the same spies."""
    for kind in spies:
        spies[kind].clear()
    with load(path, key=key_file, trusted_signers=[public_bytes(owner)]) as session:
        assert session.run(np.zeros((1, 16), np.float32))["logits"].shape == (1, 10)
    assert len(spies["parsed"]) == 1 and len(spies["backends"]) == 1


def test_writer_picks_the_version_and_names_the_digest(signed, mlp, tmp_path, key_file):
    with Bundle.open(signed) as bundle:
        version = bundle.manifest.format_version
        descriptor = bundle.manifest.document["signature"]
    assert descriptor.get("digest") == ("BLAKE3" if version == 2 else None)
    unsigned = tmp_path / "unsigned.mcb"
    protect(mlp, unsigned, key=key_file, chunk_size=CHUNK)
    with Bundle.open(unsigned) as bundle:
        assert bundle.manifest.format_version == 1  # unchanged layout: older readers still read it


def test_enclave_sections_stay_in_format_1(tmp_path, key_file, other_key_file):
    master, spec = key_file.new_key()
    enclave, _ = other_key_file.new_key()
    source = [SectionSource("a", 10, lambda: [b"a" * 10]), SectionSource("e", 10, lambda: [b"e" * 10], key="enclave")]
    try:
        common = dict(master_key=master.view(), key_spec=spec, scheme="test", sections=source, extra={})
        signer = Ed25519PrivateKey.generate()
        written = write_bundle(tmp_path / "a.mcb", **common, signer=signer, enclave_key=enclave.view())
        assert written.format_version == 1  # the enclaves read version 1 headers only
        with pytest.raises(BundleError, match="written as format version 1"):
            write_bundle(tmp_path / "b.mcb", **common, signer=signer, enclave_key=enclave.view(), format_version=2)
    finally:
        master.close()
        enclave.close()


@pytest.mark.parametrize("section,change", [("weights", flip_first_float), ("graph", break_graph)])
def test_reencrypted_by_a_key_holder_is_never_parsed_or_built(
    tmp_path, signed, key_file, owner, spies, section, change
):
    forged = forge(signed, key_file, tmp_path / "forged.mcb", change={section: change})
    # Control: the forgery is valid under the model key (header MAC and every AEAD tag pass) and the
    # changed plaintext comes out. Only the signature stands in the way.
    expected = plaintexts(signed, key_file)[section]
    change(expected)
    assert plaintexts(forged, key_file)[section] == expected
    for kind in spies:
        spies[kind].clear()

    with pytest.raises(SignatureError, match="signature is invalid"):
        load(forged, key=key_file, trusted_signers=[public_bytes(owner)])
    assert spies["parsed"] == [] and spies["backends"] == []  # nothing decrypted was used
    with Bundle.open(forged) as bundle:
        streamed = bundle.manifest.format_version == 2
    # Format 2 decrypts while hashing, into guarded buffers that are wiped on the refusal; format 1
    # refuses before anything is decrypted.
    assert len(spies["buffers"]) == (2 if streamed else 0)
    assert all(buffer.closed for buffer in spies["buffers"])

    run_genuine(signed, key_file, owner, spies)


def test_a_flipped_byte_anywhere_is_refused(tmp_path, signed, key_file, owner, spies):
    with Bundle.open(signed) as bundle:
        parts = bundle.layout()
    data = signed.read_bytes()
    for name, start, end in parts:
        for offset in (start, (start + end) // 2, end - 1):
            bad = bytearray(data)
            bad[offset] ^= 0x01
            path = tmp_path / "flipped.mcb"
            path.write_bytes(bytes(bad))
            # A section or the trailer: the signature refuses it. The header parts may fail earlier
            # (magic, version, manifest JSON), each with its own bundle error.
            expected = SignatureError if name.startswith("section:") or name == "signature" else BundleError
            with pytest.raises(expected):
                load(path, key=key_file, trusted_signers=[public_bytes(owner)])
            assert spies["parsed"] == [] and spies["backends"] == [], (name, offset)
    run_genuine(signed, key_file, owner, spies)


def test_format2_signature_presented_as_format1_is_refused(tmp_path, mlp, key_file, owner, spies):
    signed = tmp_path / "v2.mcb"
    protect(mlp, signed, key=key_file, signer=owner, chunk_size=CHUNK)

    def as_version_1(document: dict[str, Any]) -> None:
        document["signature"].pop("digest")

    relabelled = forge(signed, key_file, tmp_path / "as-v1.mcb", edit=as_version_1, version=1)
    with Bundle.open(relabelled) as bundle:
        assert bundle.manifest.format_version == 1  # a well-formed format 1 bundle, MAC and all
    with pytest.raises(SignatureError, match="signature is invalid"):
        load(relabelled, key=key_file, trusted_signers=[public_bytes(owner)])
    assert spies["parsed"] == [] and spies["backends"] == []
    # Control: had the owner signed that very format 1 bundle, it would load; so the refusal above
    # comes from the signature's version binding, not from a broken forgery.
    resigned = forge(signed, key_file, tmp_path / "resigned.mcb", edit=as_version_1, version=1, resign=owner)
    run_genuine(resigned, key_file, owner, spies)


def test_format1_signature_presented_as_format2_is_refused(tmp_path, mlp, key_file, owner, spies):
    old = tmp_path / "v1.mcb"
    protect(mlp, old, key=key_file, signer=owner, chunk_size=CHUNK, format_version=1)

    def as_version_2(document: dict[str, Any]) -> None:
        document["signature"]["digest"] = "BLAKE3"

    relabelled = forge(old, key_file, tmp_path / "as-v2.mcb", edit=as_version_2, version=2)
    with pytest.raises(SignatureError, match="signature is invalid"):
        load(relabelled, key=key_file, trusted_signers=[public_bytes(owner)])
    assert spies["parsed"] == [] and spies["backends"] == []
    resigned = forge(old, key_file, tmp_path / "resigned.mcb", edit=as_version_2, version=2, resign=owner)
    run_genuine(resigned, key_file, owner, spies)


@pytest.mark.parametrize(
    "version,digest", [(2, "SHA-256"), (2, None), (2, "blake3"), (1, "BLAKE3"), (1, "SHA-256")], ids=str
)
def test_a_digest_name_that_does_not_match_the_version_is_refused(tmp_path, mlp, key_file, owner, version, digest):
    path = tmp_path / "signed.mcb"
    protect(mlp, path, key=key_file, signer=owner, chunk_size=CHUNK, format_version=version)

    def rename(document: dict[str, Any]) -> None:
        document["signature"].pop("digest", None)
        if digest is not None:
            document["signature"]["digest"] = digest

    renamed = forge(path, key_file, tmp_path / "renamed.mcb", edit=rename, resign=owner)
    with pytest.raises(ManifestError, match="signature digest"):
        Bundle.open(renamed)
    # Control: the same rewrite that keeps the version's own digest name opens and loads.
    kept = forge(path, key_file, tmp_path / "kept.mcb", edit=lambda document: None, resign=owner)
    with load(kept, key=key_file, trusted_signers=[public_bytes(owner)]) as session:
        assert session.run(np.zeros((1, 16), np.float32))["logits"].shape == (1, 10)


def test_signed_messages_of_the_two_versions_never_coincide():
    digests = [bytes(32), bytes(range(32))]
    one, two = signing.signed_message(bytes(32), digests, 1), signing.signed_message(bytes(32), digests, 2)
    assert one != two and not two.startswith(one[:24])  # different context strings, same digests
    owner = Ed25519PrivateKey.generate()
    trailer = signing.make_trailer(owner, two)
    signing.verify_trailer(trailer, public_bytes(owner), two)  # control: verifies as what it was made for
    with pytest.raises(SignatureError):
        signing.verify_trailer(trailer, public_bytes(owner), one)
    with pytest.raises(BundleError):
        signing.signed_message(bytes(32), digests, 3)


def test_streamed_check_refuses_a_forgery_and_stays_refused(tmp_path, mlp, key_file, owner):
    signed = tmp_path / "signed.mcb"
    protect(mlp, signed, key=key_file, signer=owner, chunk_size=CHUNK)
    forged = forge(signed, key_file, tmp_path / "forged.mcb", change={"weights": flip_first_float})
    for path, genuine in ((signed, True), (forged, False)):
        with Bundle.open(path) as bundle:
            assert bundle.verify_signature([public_bytes(owner)], streamed=True)
            assert bundle.verification_pending  # nothing verified yet: only the signer and trailer
            decrypted_weights(bundle, key_file)  # hashed on the side while it decrypts
            if genuine:
                bundle.finish_verification()  # the graph section is hashed from the file here
                assert not bundle.verification_pending
                continue
            for _ in range(2):  # a failed check cannot be retried into success
                with pytest.raises(SignatureError):
                    bundle.finish_verification()
            with pytest.raises(SignatureError):
                bundle.section_ciphertext("weights")  # nothing leaves for an enclave either
            assert bundle.verification_pending


def test_format1_is_never_streamed(tmp_path, mlp, key_file, owner):
    path = tmp_path / "v1.mcb"
    protect(mlp, path, key=key_file, signer=owner, chunk_size=CHUNK, format_version=1)
    forged = forge(path, key_file, tmp_path / "forged.mcb", change={"weights": flip_first_float})
    with Bundle.open(forged) as bundle, pytest.raises(SignatureError):
        bundle.verify_signature([public_bytes(owner)], streamed=True)  # checked in full, at once
    with Bundle.open(path) as bundle:
        bundle.verify_signature([public_bytes(owner)], streamed=True)
        assert not bundle.verification_pending  # control: the genuine one is verified already


def test_streamed_digest_is_blake3_of_the_file(tmp_path, mlp, key_file, owner):
    import blake3

    signed = tmp_path / "signed.mcb"
    protect(mlp, signed, key=key_file, signer=owner, chunk_size=CHUNK)
    data = signed.read_bytes()
    with Bundle.open(signed) as bundle:
        _, start, end = next(part for part in bundle.layout() if part[0] == "section:weights")
        master = key_file.key_for(bundle.manifest.key)
        try:
            key = stream.derive(master.view(), bundle.manifest.salt, "section/weights")
        finally:
            master.close()
        out = bytearray(bundle.manifest.section("weights").size)

        def read(offset: int, destination: memoryview) -> None:
            destination[:] = data[start + offset : start + offset + len(destination)]

        digest = stream.decrypt_section_hashing(
            key,
            hashlib.sha256(bundle.header).digest(),
            bundle.section_index("weights"),
            "weights",
            read,
            end - start,
            memoryview(out),
            bundle.manifest.chunk_size,
            blake3.blake3(),
        )
    assert digest == blake3.blake3(data[start:end]).digest()
    assert out == plaintexts(signed, key_file)["weights"]


def test_a_file_changed_after_the_check_is_refused_when_streamed(tmp_path, mlp, key_file, owner):
    """The device operator controls the file: it can change between the check and the decryption.

    Format 2 hashes the bytes it decrypts, so the change is caught. Control: format 1 checks the
    file first and reads it again to decrypt, and the same swap then decrypts the forged weights
    after a passing check, which shows the swap really happens.
    """
    for version in (1, 2):
        signed = tmp_path / f"v{version}.mcb"
        protect(mlp, signed, key=key_file, signer=owner, chunk_size=CHUNK, format_version=version)
        forged = forge(signed, key_file, tmp_path / f"forged-v{version}.mcb", change={"weights": flip_first_float})
        expected = plaintexts(forged, key_file)["weights"]
        with Bundle.open(signed) as bundle:
            bundle.verify_signature([public_bytes(owner)], streamed=True)
            swap = os.open(forged, os.O_RDONLY)
            try:
                os.dup2(swap, bundle._source._fd)  # same descriptor, other bytes from now on
            finally:
                os.close(swap)
            out = decrypted_weights(bundle, key_file)
            assert out == expected  # the forged weights were decrypted in both versions
            if version == 2:
                with pytest.raises(SignatureError, match="signature is invalid"):
                    bundle.finish_verification()
            else:
                bundle.finish_verification()  # nothing pending: the check before passed
                assert not bundle.verification_pending


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 5, 10 * CHUNK - 1])
def test_streamed_decryption_matches_the_plain_path_at_every_size(size):
    import blake3

    key, manifest_digest = bytes(range(32)), hashlib.sha256(b"header").digest()
    plain = os.urandom(size)
    sealed = b"".join(stream.encrypt_section(key, manifest_digest, 2, size, [plain], CHUNK))

    def read(offset: int, destination: memoryview) -> None:
        destination[:] = sealed[offset : offset + len(destination)]

    out = bytearray(size)
    digest = stream.decrypt_section_hashing(
        key, manifest_digest, 2, "s", read, len(sealed), memoryview(out), CHUNK, blake3.blake3()
    )
    assert out == plain and digest == blake3.blake3(sealed).digest()
    # Control: a flipped byte in the last chunk is still refused by its AEAD tag on this path.
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(TamperedError):
        stream.decrypt_section_hashing(
            key,
            manifest_digest,
            2,
            "s",
            lambda offset, destination: destination.__setitem__(slice(None), bad[offset : offset + len(destination)]),
            len(bad),
            memoryview(bytearray(size)),
            CHUNK,
            blake3.blake3(),
        )


def test_a_signed_fhe_bundle_streams_its_extra_sections_too(tmp_path, key_file, owner, spies):
    """The fhe scheme decrypts public sections besides the graph (`open_graph(also=...)`): they are
    hashed as they are decrypted and nothing is handed on before the signature matched."""
    pytest.importorskip("tenseal")
    from support.models import make_mlp

    path = tmp_path / "head.mcb"
    model = make_mlp(sizes=(16, 32, 10), seed=5)
    protect(
        model, path, key=key_file, scheme="fhe", cut={"last": 1}, fhe={"secret_out": tmp_path / "o.fhe"}, signer=owner
    )
    with Bundle.open(path) as bundle:
        assert bundle.manifest.format_version == 2
        extra = [e.name for e in bundle.manifest.sections if not e.name.startswith("public.")]
    assert extra  # the scheme really has sections besides the public graph and weights
    forged = forge(
        path, key_file, tmp_path / "forged.mcb", change={extra[0]: lambda plain: plain.__setitem__(0, plain[0] ^ 1)}
    )
    with pytest.raises(SignatureError, match="signature is invalid"):
        load(forged, key=key_file, trusted_signers=[public_bytes(owner)])
    assert spies["parsed"] == [] and spies["backends"] == []
    with load(path, key=key_file, trusted_signers=[public_bytes(owner)]) as session:  # control
        assert len(spies["backends"]) == 1 and session is not None
