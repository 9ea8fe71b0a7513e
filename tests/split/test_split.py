"""Split bundles end to end: for every cut of four architectures, the host + enclave pair computes
exactly what the whole model computes, under each output policy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import split_models

from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.model.cut import candidate_cuts
from modelcloak.protector import protect
from modelcloak.runtime import SessionError, SplitSession

ARCHITECTURES = ("mlp", "cnn", "residual_bn", "text_cnn")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split-keys")
    return generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key"), folder


def _whole(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_cut_reproduces_the_whole_model(name, keys):
    host_key, enclave_key, folder = keys
    model = getattr(split_models, name)()
    feeds = split_models.sample_input(name, 5)
    expected = _whole(model, feeds)
    cuts = candidate_cuts(model)
    assert cuts, name
    for cut in cuts:
        bundle = folder / f"{name}-{cut.index}.mcb"
        protect(
            model,
            bundle,
            key=host_key,
            scheme="split",
            cut={"index": cut.index},
            enclave_key=enclave_key,
            policy={"output": "scores"},
            verify=False,
        )
        with load(bundle, key=host_key, enclave_key_file=enclave_key.path) as session:
            assert isinstance(session, SplitSession)
            got = next(iter(session.run(feeds).values()))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"{name} cut {cut.index}")
        assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_label_and_topk_policies(name, keys):
    host_key, enclave_key, folder = keys
    model = getattr(split_models, name)()
    feeds = split_models.sample_input(name, 7)
    expected = _whole(model, feeds)
    last = candidate_cuts(model)[-1].index
    for policy, check in (
        ("label", lambda out: np.testing.assert_array_equal(out, expected.argmax(-1))),
        (
            "topk:3",
            lambda out: np.testing.assert_array_equal(out, np.argsort(-expected, axis=-1, kind="stable")[:, :3]),
        ),
    ):
        bundle = folder / f"{name}-{policy.replace(':', '')}.mcb"
        protect(
            model,
            bundle,
            key=host_key,
            scheme="split",
            cut={"index": last},
            enclave_key=enclave_key,
            policy={"output": policy},
            verify=False,
        )
        with load(bundle, key=host_key, enclave_key_file=enclave_key.path) as session:
            outputs = session.run(feeds)
            assert len(outputs) == 1
            check(next(iter(outputs.values())))


def test_split_bundle_hides_the_private_part_from_the_host_key(keys):
    from modelcloak.bundle import Bundle, BundleError

    host_key, enclave_key, folder = keys
    bundle = folder / "hidden.mcb"
    protect(split_models.mlp(), bundle, key=host_key, scheme="split", cut={"last": 1}, enclave_key=enclave_key)
    with Bundle.open(bundle) as sealed:
        assert [s.key for s in sealed.manifest.sections] == ["host", "host", "enclave"]
        master = host_key.key_for(sealed.manifest.key)
        try:
            with pytest.raises(BundleError, match="sealed for the enclave"):
                sealed.decrypt_section_into(
                    "private", master.view(), memoryview(bytearray(sealed.manifest.section("private").size))
                )
        finally:
            master.close()
        assert "fc2" not in str(sealed.manifest.document)  # the private graph's node names stay hidden


def test_split_bundle_needs_the_enclave_key(keys):
    host_key, enclave_key, folder = keys
    bundle = folder / "needs.mcb"
    protect(split_models.mlp(), bundle, key=host_key, scheme="split", cut={"last": 1}, enclave_key=enclave_key)
    with pytest.raises(SessionError, match="enclave"):
        load(bundle, key=host_key)
    wrong = generate_key_file(folder / "wrong-enclave.key")
    with pytest.raises(SessionError, match="wrong enclave key"):
        load(bundle, key=host_key, enclave_key_file=wrong.path)
