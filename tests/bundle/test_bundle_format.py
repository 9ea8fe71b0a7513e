"""The bundle format: round trip, and every kind of tampering refused with an error naming the part."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelcloak.bundle import (
    Bundle,
    BundleError,
    ManifestError,
    NotABundleError,
    SignatureError,
    TamperedError,
    UnsupportedVersionError,
    WrongKeyError,
    stream,
)
from modelcloak.bundle.manifest import parse_manifest
from modelcloak.keys import Passphrase
from modelcloak.protector import protect

CHUNK = 4096  # the smallest allowed chunk, so the test model spans several chunks per section


def read_everything(path: Path, key, trusted=None) -> dict[str, bytes]:
    """Everything a device does before handing plaintext to a runtime; returns the plaintext sections."""
    with Bundle.open(path) as bundle:
        bundle.verify_signature(trusted)
        master = key.key_for(bundle.manifest.key)
        try:
            bundle.check_key(master.view())
            sections = {}
            for entry in bundle.manifest.sections:
                out = bytearray(entry.size)
                bundle.decrypt_section_into(entry.name, master.view(), memoryview(out))
                sections[entry.name] = bytes(out)
            return sections
        finally:
            master.close()


@pytest.fixture
def sealed(tmp_path, mlp, key_file) -> Path:
    path = tmp_path / "mlp.mcb"
    protect(mlp, path, key=key_file, chunk_size=CHUNK)
    return path


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_round_trip_restores_every_weight(sealed, mlp, key_file):
    sections = read_everything(sealed, key_file)
    weights = sections["weights"]
    for tensor in mlp.graph.initializer:
        # Large tensors move to the weights section; small ones stay inline in the (encrypted) graph.
        home = weights if len(tensor.raw_data) >= 1024 else sections["graph"]
        assert tensor.raw_data in home, tensor.name
    with Bundle.open(sealed) as bundle:
        assert bundle.manifest.section("weights").size == len(weights)


def test_ciphertext_does_not_contain_weights(sealed, mlp):
    data = sealed.read_bytes()
    for tensor in mlp.graph.initializer:
        assert tensor.raw_data[:32] not in data


def test_sections_span_several_chunks(sealed):
    with Bundle.open(sealed) as bundle:
        assert bundle.manifest.section("weights").size > 2 * CHUNK


def layout(path: Path) -> dict[str, tuple[int, int]]:
    with Bundle.open(path) as bundle:
        return {name: (start, end) for name, start, end in bundle.layout()}


def flipped(path: Path, position: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    "part, expected",
    [
        ("prefix:magic", NotABundleError),
        ("prefix:version", UnsupportedVersionError),
        ("prefix:length", BundleError),
        ("manifest", BundleError),
        ("header-mac", TamperedError),
        ("section:graph", TamperedError),
        ("section:weights", TamperedError),
    ],
)
def test_flipping_any_part_is_refused(tmp_path, sealed, key_file, part, expected):
    parts = layout(sealed)
    if part.startswith("prefix:"):
        position = {"magic": 3, "version": 9, "length": 12}[part.split(":")[1]]
        positions = [position]
    else:
        start, end = parts[part]
        positions = sorted({start, (start + end) // 2, end - 1})
    for position in positions:
        with pytest.raises(expected) as caught:
            read_everything(flipped(sealed, position, tmp_path / "bad.mcb"), key_file)
        assert str(caught.value), "errors must say what failed"


def test_flipped_chunk_error_names_section_and_chunk(tmp_path, sealed, key_file):
    start, _ = layout(sealed)["section:weights"]
    position = start + CHUNK + stream.TAG_SIZE + 5  # inside chunk 1
    with pytest.raises(TamperedError, match=r"section 'weights' chunk 1 of \d+ failed authentication"):
        read_everything(flipped(sealed, position, tmp_path / "bad.mcb"), key_file)


def test_manifest_edit_that_keeps_valid_json_fails_header_authentication(tmp_path, sealed, key_file):
    data = sealed.read_bytes()
    edited = data.replace(b'"dtype":"float32"', b'"dtype":"float64"', 1)
    assert edited != data and len(edited) == len(data)
    (tmp_path / "bad.mcb").write_bytes(edited)
    with pytest.raises(TamperedError, match="header authentication failed"):
        read_everything(tmp_path / "bad.mcb", key_file)


def test_every_truncation_is_refused(tmp_path, sealed, key_file):
    data = sealed.read_bytes()
    for cut in sorted({0, 5, 13, 100, len(data) // 2, len(data) - 17, len(data) - 1}):
        (tmp_path / "cut.mcb").write_bytes(data[:cut])
        with pytest.raises(BundleError) as caught:
            read_everything(tmp_path / "cut.mcb", key_file)
        if cut > 200:
            assert "truncated" in str(caught.value)


def test_appended_bytes_are_refused(tmp_path, sealed, key_file):
    (tmp_path / "long.mcb").write_bytes(sealed.read_bytes() + b"\x00")
    with pytest.raises(TamperedError, match="unexpected bytes"):
        read_everything(tmp_path / "long.mcb", key_file)


def test_reordered_chunks_are_refused(tmp_path, sealed, key_file):
    start, _ = layout(sealed)["section:weights"]
    step = CHUNK + stream.TAG_SIZE
    data = bytearray(sealed.read_bytes())
    first, second = bytes(data[start : start + step]), bytes(data[start + step : start + 2 * step])
    data[start : start + step], data[start + step : start + 2 * step] = second, first
    (tmp_path / "swapped.mcb").write_bytes(bytes(data))
    with pytest.raises(TamperedError, match="chunk 0"):
        read_everything(tmp_path / "swapped.mcb", key_file)


def test_chunks_spliced_from_another_bundle_with_the_same_key_are_refused(tmp_path, sealed, mlp, key_file):
    other = tmp_path / "other.mcb"
    protect(mlp, other, key=key_file, chunk_size=CHUNK)  # same model, same key, fresh salt
    start, end = layout(sealed)["section:weights"]
    assert layout(other)["section:weights"] == (start, end)
    mine, theirs = bytearray(sealed.read_bytes()), other.read_bytes()
    step = CHUNK + stream.TAG_SIZE
    mine[start + step : start + 2 * step] = theirs[start + step : start + 2 * step]
    (tmp_path / "spliced.mcb").write_bytes(bytes(mine))
    with pytest.raises(TamperedError, match="chunk 1"):
        read_everything(tmp_path / "spliced.mcb", key_file)
    # A whole section moved across bundles fails too.
    mine = bytearray(sealed.read_bytes())
    mine[start:end] = theirs[start:end]
    (tmp_path / "spliced.mcb").write_bytes(bytes(mine))
    with pytest.raises(TamperedError, match="section 'weights'"):
        read_everything(tmp_path / "spliced.mcb", key_file)


def test_sections_cannot_be_swapped(tmp_path, key_file):
    # Two sections of equal size: swapping their ciphertext must fail (section index and key bind them).
    from modelcloak.bundle import SectionSource, write_bundle

    master, spec = key_file.new_key()
    path = tmp_path / "two.mcb"
    try:
        write_bundle(
            path,
            master_key=master.view(),
            key_spec=spec,
            scheme="test",
            sections=[SectionSource("a", 5000, lambda: [b"a" * 5000]), SectionSource("b", 5000, lambda: [b"b" * 5000])],
            extra={},
            chunk_size=CHUNK,
        )
    finally:
        master.close()
    assert read_everything(path, key_file) == {"a": b"a" * 5000, "b": b"b" * 5000}
    parts = layout(path)
    (a0, a1), (b0, b1) = parts["section:a"], parts["section:b"]
    data = bytearray(path.read_bytes())
    data[a0:a1], data[b0:b1] = bytes(data[b0:b1]), bytes(data[a0:a1])
    (tmp_path / "swapped.mcb").write_bytes(bytes(data))
    with pytest.raises(TamperedError, match="section 'a'"):
        read_everything(tmp_path / "swapped.mcb", key_file)


def reader(ciphertext: bytes):
    def read(offset: int, destination: memoryview) -> None:
        piece = ciphertext[offset : offset + len(destination)]
        if len(piece) != len(destination):
            raise TamperedError("short read")
        destination[:] = piece

    return read


def test_final_chunk_flag_stops_truncation_at_a_chunk_boundary():
    key, digest = bytes(32), hashlib.sha256(b"manifest").digest()
    plain = bytes(range(256)) * 48  # 3 chunks of 4096
    chunks = list(stream.encrypt_section(key, digest, 0, len(plain), [plain], CHUNK))
    assert len(chunks) == 3
    out = bytearray(len(plain))
    stream.decrypt_section_into(key, digest, 0, "s", reader(b"".join(chunks)), memoryview(out), CHUNK)
    assert bytes(out) == plain
    # Drop the last chunk and pretend the section was two chunks long: chunk 1 was not sealed as final.
    short = bytearray(2 * CHUNK)
    with pytest.raises(TamperedError, match="chunk 1 of 2"):
        stream.decrypt_section_into(key, digest, 0, "s", reader(b"".join(chunks[:2])), memoryview(short), CHUNK)


def test_wrong_key_is_named(sealed, other_key_file):
    with pytest.raises(WrongKeyError, match="wrong key"):
        read_everything(sealed, other_key_file)


def test_passphrase_round_trip_and_wrong_passphrase(tmp_path, mlp):
    path = tmp_path / "pw.mcb"
    fast = {"n": 2**14, "r": 8, "p": 1}  # the test keeps scrypt cheap; the default is 2^17
    protect(mlp, path, key=Passphrase("correct horse", **fast), chunk_size=CHUNK)
    kdf = Bundle.open(path).manifest.key["kdf"]
    assert kdf["name"] == "scrypt" and kdf["n"] == 2**14
    assert read_everything(path, Passphrase("correct horse"))["weights"]
    with pytest.raises(WrongKeyError):
        read_everything(path, Passphrase("wrong horse"))


def test_unknown_format_version_is_named(tmp_path, sealed, key_file):
    data = bytearray(sealed.read_bytes())
    data[8:10] = struct.pack(">H", 3)  # versions 1 and 2 exist
    (tmp_path / "v3.mcb").write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersionError, match="format version 3"):
        read_everything(tmp_path / "v3.mcb", key_file)


def test_not_a_bundle(tmp_path, key_file, mlp):
    (tmp_path / "model.onnx").write_bytes(mlp.SerializeToString())
    with pytest.raises(NotABundleError, match="not a modelcloak bundle"):
        read_everything(tmp_path / "model.onnx", key_file)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(NotABundleError, match="empty"):
        read_everything(tmp_path / "empty", key_file)
    with pytest.raises(BundleError, match="does not exist"):
        read_everything(tmp_path / "missing.mcb", key_file)


def test_signed_bundle_verifies_and_pins_the_signer(tmp_path, mlp, key_file, signer):
    path = tmp_path / "signed.mcb"
    protect(mlp, path, key=key_file, signer=signer, chunk_size=CHUNK)
    assert read_everything(path, key_file, trusted=[public_bytes(signer)])["weights"]
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="not a trusted signer"):
        read_everything(path, key_file, trusted=[public_bytes(stranger)])


@pytest.mark.parametrize("part", ["section:weights", "signature", "header-mac"])
def test_signature_catches_changes_before_decryption(tmp_path, mlp, key_file, signer, part):
    path = tmp_path / "signed.mcb"
    protect(mlp, path, key=key_file, signer=signer, chunk_size=CHUNK)
    start, end = layout(path)[part]
    bad = flipped(path, (start + end) // 2, tmp_path / "bad.mcb")
    with Bundle.open(bad) as bundle, pytest.raises(SignatureError):
        bundle.verify_signature([public_bytes(signer)])


def test_unsigned_bundle_refused_when_signature_required(sealed, signer):
    with Bundle.open(sealed) as bundle:
        with pytest.raises(SignatureError, match="not signed"):
            bundle.verify_signature([public_bytes(signer)])
        with pytest.raises(SignatureError, match="not signed"):
            bundle.verify_signature(None, require=True)
        assert bundle.verify_signature() is None


def test_stripped_signature_is_detected(tmp_path, mlp, key_file, signer):
    path = tmp_path / "signed.mcb"
    protect(mlp, path, key=key_file, signer=signer, chunk_size=CHUNK)
    start, _ = layout(path)["signature"]
    (tmp_path / "stripped.mcb").write_bytes(path.read_bytes()[:start])
    with pytest.raises(TamperedError, match="truncated"):
        read_everything(tmp_path / "stripped.mcb", key_file)


def test_protect_writes_nothing_when_it_fails(tmp_path, key_file):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    from modelcloak.model import ModelError

    with pytest.raises(ModelError, match="not an ONNX model"):
        protect(bad, tmp_path / "out.mcb", key=key_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "model.key"]


# --- property tests on the parser: hostile bytes only ever raise BundleError -------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_parser_rejects_arbitrary_bytes_cleanly(data):
    try:
        Bundle.from_bytes(data).close()
    except BundleError:
        pass


_SEALED_CACHE: dict[str, bytes] = {}


def _sealed_bytes(tmp_path_factory, mlp_model, key) -> bytes:
    if "data" not in _SEALED_CACHE:
        path = tmp_path_factory.mktemp("prop") / "p.mcb"
        protect(mlp_model, path, key=key, chunk_size=CHUNK)
        _SEALED_CACHE["data"] = path.read_bytes()
    return _SEALED_CACHE["data"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutation=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_any_mutation_is_refused_never_garbage(tmp_path_factory, mlp, key_file, mutation, cut):
    original = _sealed_bytes(tmp_path_factory, mlp, key_file)
    data = bytearray(original)
    for position, value in mutation:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    if bytes(data) == original:
        return
    path = tmp_path_factory.mktemp("mut") / "m.mcb"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        read_everything(path, key_file)


@settings(max_examples=200, deadline=None)
@given(
    document=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6),
        max_leaves=20,
    )
)
def test_manifest_parser_only_raises_manifest_error(document):
    import json

    raw = json.dumps(document).encode()
    try:
        parse_manifest(raw, 1)
    except ManifestError:
        pass


def test_signer_key_material_of_the_wrong_length_is_named_not_read_as_a_path():
    from modelcloak.bundle.signing import load_public_key

    raw = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert load_public_key(raw) == raw  # control: 32 raw bytes are taken as they are
    with pytest.raises(SignatureError, match="a raw signer key is 32 bytes, got 31"):
        load_public_key(raw[:31])
