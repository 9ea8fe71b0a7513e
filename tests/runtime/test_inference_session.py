"""`modelcloak.InferenceSession` is a drop-in for `onnxruntime.InferenceSession`.

One inference script, written against onnxruntime's API, runs unchanged (bar its constructor line)
on the plain model and on seal, lock and split bundles of it, and gets identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import split_models

import modelcloak
from modelcloak.keys import KeyFile, generate_key_file
from modelcloak.keys.device import SoftwareDeviceKey, enroll_software_device, write_lock_key_file
from modelcloak.options import CutSelector, LoadOptions, LockOptions, OptionError
from modelcloak.runtime import SessionError


def inference_script(session) -> dict[str, object]:
    """What typical onnxruntime user code does: read the signature, feed by name, run, read metadata."""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    feeds = {inputs[0].name: split_models.sample_input("cnn", 6)["x"]}
    everything = session.run(None, feeds)
    first_only = session.run([outputs[0].name], feeds)
    return {
        "input": (inputs[0].name, inputs[0].type, len(inputs[0].shape)),
        "output_names": [o.name for o in outputs],
        "all": everything,
        "first": first_only,
        "providers": session.get_providers(),
        "producer": session.get_modelmeta().producer_name,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference-session")
    model = split_models.cnn()
    model_path = folder / "model.onnx"
    model_path.write_bytes(model.SerializeToString())
    host = generate_key_file(folder / "host.key")
    enclave = generate_key_file(folder / "enclave.key")
    machine = folder / "machine" / "etc"
    machine.mkdir(parents=True)
    (machine / "machine-id").write_text("c" * 32 + "\n")
    enroll_software_device(folder / "state", identity_root=machine.parent)
    device = SoftwareDeviceKey(folder / "state", identity_root=machine.parent)
    root = device.export_lock_key()
    try:
        lock_file = write_lock_key_file(folder / "device.lock", root, device.identity)
    finally:
        root.close()
    from modelcloak.keys.device import DeviceLockKey

    modelcloak.protect(model_path, folder / "seal.mcb", key=host)
    modelcloak.protect(
        model_path, folder / "lock.mcb", key=host, scheme="lock", lock=LockOptions([DeviceLockKey.from_file(lock_file)])
    )
    modelcloak.protect(
        model_path,
        folder / "split.mcb",
        key=host,
        scheme="split",
        cut=CutSelector(last=1),
        enclave_key=KeyFile(enclave.path),
        policy=modelcloak.OutputPolicy("scores"),
    )
    modelcloak.protect(
        model_path,
        folder / "label.mcb",
        key=host,
        scheme="split",
        cut=CutSelector(last=1),
        enclave_key=KeyFile(enclave.path),
    )
    return folder, model_path, host, enclave, device


def _bundle_session(world, name: str) -> modelcloak.InferenceSession:
    folder, _, host, enclave, device = world
    settings = {"seal": {}, "lock": {"device_key": device}, "split": {"enclave_key_file": enclave.path}}[name]
    return modelcloak.InferenceSession(folder / f"{name}.mcb", key=host, providers=["CPUExecutionProvider"], **settings)


@pytest.mark.parametrize("scheme", ["seal", "lock", "split"])
def test_the_same_script_gives_identical_outputs(world, scheme):
    _, model_path, *_ = world
    plain = inference_script(ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]))
    with _bundle_session(world, scheme) as session:
        protected = inference_script(session)
    assert protected["input"] == plain["input"]
    assert protected["output_names"] == plain["output_names"]
    assert len(protected["all"]) == len(plain["all"]) == 1
    if scheme == "split":  # the same two halves, run in two processes
        np.testing.assert_allclose(protected["all"][0], plain["all"][0], atol=1e-5, rtol=0)
    else:  # the same graph and kernels: bit-identical
        np.testing.assert_array_equal(protected["all"][0], plain["all"][0])
    np.testing.assert_array_equal(protected["first"][0], protected["all"][0])
    assert protected["providers"] == ["CPUExecutionProvider"]
    assert protected["producer"].startswith(plain["producer"])


def test_label_policy_split_returns_the_plain_models_labels(world):
    folder, model_path, host, enclave, _ = world
    feeds = split_models.sample_input("cnn", 6)
    logits = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with modelcloak.InferenceSession(folder / "label.mcb", key=host, enclave_key_file=enclave.path) as session:
        (output,) = session.get_outputs()
        assert output.type == "tensor(int64)"  # labels, not the model's scores
        (labels,) = session.run(None, feeds)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))


def test_wrong_names_and_options_are_refused_with_the_parameter_named(world):
    folder, _, host, enclave, _ = world
    with modelcloak.InferenceSession(folder / "seal.mcb", key=host) as session:
        with pytest.raises(SessionError, match="unknown output name"):
            session.run(["nope"], split_models.sample_input("cnn", 1))
        with pytest.raises(SessionError, match="input_feed must be a dict"):
            session.run(None, [1, 2, 3])
    with pytest.raises(SessionError, match="enclave"):  # a split bundle without its enclave key
        modelcloak.InferenceSession(folder / "split.mcb", key=host)
    with pytest.raises(OptionError, match="threads") as caught:
        modelcloak.InferenceSession(folder / "seal.mcb", key=host, threads=0)
    assert caught.value.parameter == "threads"
    with pytest.raises(OptionError, match="unknown load option 'treads'"):
        modelcloak.load(folder / "seal.mcb", key=host, treads=2)
    with pytest.raises(OptionError, match="give the enclave key one way"):
        LoadOptions.from_keywords(enclave_key_file=enclave.path, enclave_key_env="X")


def test_options_object_and_keywords_are_the_same(world):
    folder, _, host, enclave, _ = world
    options = LoadOptions.from_keywords(enclave_key_file=enclave.path, enclave_timeout=20.0)
    assert options.enclave is not None and options.enclave.timeout == 20.0
    feeds = split_models.sample_input("cnn", 2)
    with modelcloak.load(folder / "split.mcb", key=host, options=options) as a:
        first = a.run(feeds)
    with modelcloak.load(folder / "split.mcb", key=host, enclave_key_file=enclave.path) as b:
        second = b.run(feeds)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_the_package_exports_are_real_for_type_checkers():
    """`import modelcloak` exposes the entry points by name; py.typed ships so checkers read them."""
    import modelcloak as package

    for name in package.__all__:
        assert getattr(package, name) is not None, name
    assert (Path(package.__file__).parent / "py.typed").exists()
    from modelcloak.lock.layout import SEALED
    from modelcloak.lock.transform import METHODS
    from modelcloak.options import LOCK_METHODS

    # The options module's copy must not drift: `sealed` (the default) and the transform's methods.
    assert tuple(LOCK_METHODS) == (SEALED, *METHODS)
