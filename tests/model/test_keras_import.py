"""load_keras: .keras and .h5 models through Keras 3 on the torch backend, checked against Keras.

The model is eNNclave's shape: a Keras Sequential with Conv2D, MaxPooling2D, Flatten, Dense,
Dropout and a softmax Dense, saved in both formats, imported, compared with Keras' own
predictions, then cut: every candidate split must reproduce it too.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelcloak.model.cut import candidate_cuts, find_cut, split_model
from modelcloak.model.errors import ModelError
from modelcloak.model.keras_import import load_keras

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("keras") is None or importlib.util.find_spec("torch") is None,
        reason="the keras extra (keras>=3 with torch) is not installed",
    ),
    # Keras' torch backend converts tensors with np.array(x), which numpy 2 flags; not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The Keras model, its Keras predictions, and its two saved files."""
    folder = tmp_path_factory.mktemp("keras")
    # A missing file is refused before Keras is imported; loading it first also makes
    # load_keras choose the torch backend before this test imports Keras itself.
    with pytest.raises(ModelError):
        load_keras(folder / "absent.keras")
    probe = folder / "probe.keras"
    probe.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"Keras could not load probe.keras"):
        load_keras(probe)

    import keras

    assert keras.backend.backend() == "torch"
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    paths = {"keras": folder / "ennclave.keras", "h5": folder / "ennclave.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    rng = np.random.default_rng(0)
    inputs = {batch: rng.random((batch, 28, 28, 1), dtype=np.float32) for batch in (1, 5)}
    expected = {batch: np.asarray(model.predict(x, verbose=0)) for batch, x in inputs.items()}
    return paths, inputs, expected


@pytest.fixture(scope="module")
def imported(saved):
    paths, _, _ = saved
    return {fmt: load_keras(path) for fmt, path in paths.items()}


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_imported_model_matches_keras(saved, imported, fmt):
    _, inputs, expected = saved
    model = imported[fmt]
    onnx.checker.check_model(model, full_check=True)
    assert not any(node.op_type == "Dropout" for node in model.graph.node), "Dropout is off at inference"
    (value,) = model.graph.input
    assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == ["batch", 28, 28, 1]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, x in inputs.items():
        (got,) = session.run(None, {value.name: x})
        np.testing.assert_allclose(got, expected[batch], atol=1e-5, rtol=0)
        assert np.array_equal(got.argmax(axis=1), expected[batch].argmax(axis=1))


def test_every_cut_of_the_keras_model_matches_keras(saved, imported):
    _, inputs, expected = saved
    model = imported["keras"]
    cuts = candidate_cuts(model)
    assert len(cuts) >= 5
    # eNNclave's cut: the dense head (the last two Dense layers) in the enclave.
    head = find_cut(model, last=2)
    assert head.private_layers == 2 and head.boundary[0].shape == ("batch", 1352)
    for cut in cuts:
        public, private = split_model(model, cut)
        public_session = ort.InferenceSession(public.SerializeToString(), providers=["CPUExecutionProvider"])
        private_session = ort.InferenceSession(private.SerializeToString(), providers=["CPUExecutionProvider"])
        for batch, x in inputs.items():
            feeds = {model.graph.input[0].name: x}
            produced = dict(zip([o.name for o in public_session.get_outputs()], public_session.run(None, feeds)))
            (got,) = private_session.run(None, {name: produced.get(name, feeds.get(name)) for name in cut.tensors})
            np.testing.assert_allclose(got, expected[batch], atol=1e-5, rtol=0, err_msg=cut.after_node)


def test_savedmodel_directories_need_tensorflow(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ModelError, match=r"SavedModel directory; reading it needs TensorFlow"):
        load_keras(tmp_path)


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"Keras models are .keras or .h5 files"):
        load_keras(path)
