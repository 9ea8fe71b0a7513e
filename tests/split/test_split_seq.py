"""Split bundles of models with a second dynamic axis (issue 13): a BERT-style encoder and
sequence-first GRU/LSTM models, every cut, at two sequence lengths, through real bundles and
enclaves, equal to the whole model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import seq_models

from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.model.cut import candidate_cuts, split_model, verify_split
from modelcloak.model.errors import ModelError
from modelcloak.protector import protect

SEQUENCE_LENGTHS = (5, 11)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seq-keys")
    return generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key"), folder


def _model(name: str) -> onnx.ModelProto:
    model = seq_models.bert() if name == "bert" else seq_models.recurrent(name)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _feeds(name: str, batch: int, seq: int) -> dict[str, np.ndarray]:
    return seq_models.bert_input(batch, seq) if name == "bert" else seq_models.recurrent_input(batch, seq)


def _whole(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _check_cuts(name: str, indices: list[int] | None, keys) -> int:
    host_key, enclave_key, folder = keys
    model = _model(name)
    cuts = candidate_cuts(model)
    assert len(cuts) > 5, name
    chosen = cuts if indices is None else [cuts[i] for i in indices]
    cases = [(seq, _feeds(name, 3, seq)) for seq in SEQUENCE_LENGTHS]
    expected = [_whole(model, feeds) for _, feeds in cases]
    for cut in chosen:
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
            for (seq, feeds), want in zip(cases, expected):
                got = next(iter(session.run(feeds).values()))
                np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{name} cut {cut.index} seq {seq}")
        bundle.unlink()
    return len(chosen)


# The cuts the issue reported broken: right after the position Range (a [seq] tensor), across the
# [batch,1,1,seq] attention mask, inside an attention block, and the last one.
BERT_SAMPLE = [3, 12, 40, -1]


def test_bert_sample_of_cuts_equals_the_whole_model(keys):
    assert _check_cuts("bert", BERT_SAMPLE, keys) == len(BERT_SAMPLE)


@pytest.mark.slow
def test_bert_every_cut_equals_the_whole_model(keys):
    assert _check_cuts("bert", None, keys) > 90


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrent_sequence_first_every_cut_equals_the_whole_model(kind, keys):
    assert _check_cuts(kind, None, keys) > 5


def test_cuts_keep_the_sequence_axis_symbolic():
    model = _model("bert")
    for cut in candidate_cuts(model):
        for spec in cut.boundary:
            # Every activation of rank >= 3 in this encoder ([batch,seq,16] states, the
            # [batch,1,1,seq] mask, [batch,heads,seq,seq] scores) carries the sequence axis; a
            # frozen one would read as a fixed 1 here.
            if spec.dtype.startswith("float") and len(spec.shape) >= 3:
                assert "seq" in spec.shape, (cut.index, spec)
    gru = _model("gru")
    for cut in candidate_cuts(gru):
        for spec in cut.boundary:
            if spec.dtype.startswith("float"):  # [seq,batch,F], GRU's [seq,1,batch,H], state [1,batch,H]
                assert "batch" in spec.shape and spec.shape[0] in ("seq", 1), (cut.index, spec)
        assert any("seq" in spec.shape for cut in candidate_cuts(gru) for spec in cut.boundary)


def test_verify_split_refuses_a_boundary_that_freezes_the_sequence():
    """Negative control: the boundary the old shape probe declared ([?,1,1,1] for the mask) is refused."""
    model = _model("bert")
    cut = candidate_cuts(model)[12]
    public, private = split_model(model, cut)
    verify_split(model, public, private, cut)  # the real cut passes
    frozen_boundary = tuple(
        type(spec)(spec.name, spec.dtype, tuple(1 if d == "seq" else d for d in spec.shape)) for spec in cut.boundary
    )
    frozen = type(cut)(**{**cut.__dict__, "boundary": frozen_boundary})
    with pytest.raises(ModelError, match="declares boundary tensor .* but at batch=.*seq="):
        verify_split(model, public, private, frozen)


@pytest.mark.parametrize("batch_named", [True, False])
def test_budget_counts_the_declared_batch_axis(keys, batch_named, monkeypatch):
    """A sequence-first boundary [seq, batch, F] is charged `batch` samples per call, not `seq`.

    Control (batch_named=False): a bundle sealed with split.batch naming a symbol no input has
    (as bundles from before split.batch behave), so the enclave falls back to the leading dim and
    charges `seq`: the test tells the two rules apart.
    """
    host_key, enclave_key, folder = keys
    model = _model("gru")
    cut = candidate_cuts(model)[2]
    bundle = folder / f"gru-budget-{batch_named}.mcb"
    if not batch_named:
        monkeypatch.setattr("modelcloak.model.cut.batch_symbol", lambda model: "not-an-axis")
    protect(
        model,
        bundle,
        key=host_key,
        scheme="split",
        cut={"index": cut.index},
        enclave_key=enclave_key,
        policy={"output": "label", "query_budget": 20},
        verify=False,
    )
    feeds = _feeds("gru", batch=3, seq=7)
    with load(bundle, key=host_key, enclave_key_file=enclave_key.path) as session:
        session.run(feeds)
        left = session.enclave.stats().budget_left
    assert left == (20 - 3 if batch_named else 20 - 7)


def test_licence_counts_the_batch_axis_of_a_sequence_first_model(keys):
    """The owner backend's usage count (LicensedUse) gets the samples of the batch axis: 3 for a
    [seq=7, batch=3, F] input, where the leading dim (the rule before) would report 7."""
    host_key, _, folder = keys
    bundle = folder / "gru-sealed.mcb"
    protect(_model("gru"), bundle, key=host_key)
    feeds = _feeds("gru", batch=3, seq=7)
    assert next(iter(feeds.values())).shape[:2] == (7, 3)
    with load(bundle, key=host_key) as session:
        assert session._samples(feeds) == 3
