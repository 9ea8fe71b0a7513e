"""Models with a second dynamic axis for the cut tests (issue 13): a BERT-style encoder and a
sequence-first GRU/LSTM.

Helper module, not a test file. Both are exported from PyTorch with random weights and two
symbolic axes ("batch" and "seq"); the recurrent model keeps PyTorch's sequence-first layout,
so its batch axis is dim 1. Builders are cached (exports take seconds); callers copy the proto
before editing it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

VOCAB = 50
HIDDEN = 16
HEADS = 2
LAYERS = 2
MAX_POSITIONS = 32
CLASSES = 3
RNN_FEATURES = 6


def _export(net, args: tuple, names: list[str], axes: list[dict[int, str]]) -> onnx.ModelProto:  # noqa: ANN001
    """The TorchScript exporter, as most published transformer/RNN ONNX files were made: it keeps
    GRU/LSTM as ONNX ops (dynamo unrolls them over a fixed length) and leaves most intermediate
    shapes to inference, which is where a frozen sequence axis used to come from."""
    import io
    import warnings

    import torch

    from modelcloak.model.torch_export import _fit_ir_version, _quiet_exporter

    buffer = io.BytesIO()
    net.eval()
    with _quiet_exporter(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            args,
            buffer,
            input_names=names,
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={**dict(zip(names, axes)), "logits": _output_axes(axes)},
        )
    model = onnx.load_from_string(buffer.getvalue())
    _fit_ir_version(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _output_axes(axes: list[dict[int, str]]) -> dict[int, str]:
    return {0: "seq", 1: "batch"} if axes[0].get(0) == "seq" else {0: "batch"}


@functools.lru_cache(maxsize=None)
def bert() -> onnx.ModelProto:
    """input_ids, attention_mask [batch, seq] -> two encoder layers -> [CLS] pooler -> logits [batch, 3]."""
    import torch
    from torch import nn

    torch.manual_seed(13)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.out = nn.Linear(HIDDEN, HIDDEN)
            self.norm1 = nn.LayerNorm(HIDDEN)
            self.ff1 = nn.Linear(HIDDEN, 2 * HIDDEN)
            self.ff2 = nn.Linear(2 * HIDDEN, HIDDEN)
            self.norm2 = nn.LayerNorm(HIDDEN)

        def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, s, _ = h.shape
            q, k, v = self.qkv(h).view(b, s, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + bias
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, HIDDEN)
            h = self.norm1(h + self.out(context))
            return self.norm2(h + self.ff2(torch.nn.functional.gelu(self.ff1(h))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, HIDDEN)
            self.positions = nn.Embedding(MAX_POSITIONS, HIDDEN)
            self.norm = nn.LayerNorm(HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.pool = nn.Linear(HIDDEN, HIDDEN)
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            h = self.norm(self.tokens(input_ids) + self.positions(positions)[None])
            # HF-style extended mask: [batch, 1, 1, seq], a large negative where the mask is 0.
            keep = attention_mask[:, None, None, :].bool()
            bias = torch.where(keep, torch.zeros((), dtype=h.dtype), torch.full((), -1e4, dtype=h.dtype))
            for layer in self.layers:
                h = layer(h, bias)
            return self.head(torch.tanh(self.pool(h[:, 0])))

    ids = torch.randint(0, VOCAB, (3, 7))
    mask = torch.ones((3, 7), dtype=torch.int64)
    return _export(
        Encoder(), (ids, mask), ["input_ids", "attention_mask"], [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}]
    )


@functools.lru_cache(maxsize=None)
def recurrent(kind: str = "gru") -> onnx.ModelProto:
    """x [seq, batch, 6] (sequence first) -> GRU or LSTM(12) -> Linear(3) per step -> logits [seq, batch, 3]."""
    import torch
    from torch import nn

    torch.manual_seed(17)
    rnn_type = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(RNN_FEATURES, RNN_FEATURES)
            self.rnn = rnn_type(RNN_FEATURES, 12)  # batch_first=False: [seq, batch, features]
            self.head = nn.Linear(12, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(torch.relu(self.inp(x)))
            return self.head(out)

    return _export(Recurrent(), (torch.randn(5, 3, RNN_FEATURES),), ["x"], [{0: "seq", 1: "batch"}])


def bert_input(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed * 1000 + batch * 37 + seq)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq // 2 :] = 0  # padding in the first row, so the mask matters
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq), dtype=np.int64), "attention_mask": mask}


def recurrent_input(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed * 1000 + batch * 37 + seq)
    return {"x": rng.standard_normal((seq, batch, RNN_FEATURES)).astype(np.float32)}
