"""Built-in data sets (nothing is downloaded) and the data-set contract for user data.

A data set is a :class:`Dataset`: train and test tensors, the task and the number of
classes.  Two tasks exist:

* ``classification``: ``x`` of shape (N, ...) float32, ``y`` of shape (N,) int64 in
  [0, num_classes); the model maps a batch (B, ...) to logits (B, num_classes).
* ``lm`` (next-token language model): ``x`` and ``y`` of shape (N, T) int64 token ids in
  [0, num_classes) with ``y[:, t]`` the token after ``x[:, t]``; the model maps (B, T)
  to logits (B, T, num_classes).

Built-ins: ``digits`` (scikit-learn's bundled 8x8 handwritten digits) and ``stdlib-text``
(the bytes of the Python standard library's own source files).

>>> ds = load_digits_dataset(seed=0)
>>> ds.x_train.shape, ds.num_classes
(torch.Size([1347, 1, 8, 8]), 10)
"""
from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["Task", "Dataset", "load_digits_dataset", "stdlib_corpus", "load_text_dataset",
           "epoch_order", "iterate_batches", "steps_per_epoch"]


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"
    LM = "lm"


def _task(value) -> Task:
    try:
        return Task(value)
    except ValueError:
        raise ValueError(f"unknown task {value!r}; valid choices: "
                         f"{', '.join(t.value for t in Task)}") from None


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one task (see the module docstring for the shapes).

    ``num_classes`` is the number of classes, or the vocabulary size for ``lm``.
    ``info`` holds JSON-ready provenance (source, sizes, digests) saved with results.
    """
    name: str
    task: Task
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "task", _task(self.task))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not (torch.is_tensor(x) and torch.is_tensor(y)):
                raise ValueError(f"data set {self.name!r}: x_{split} and y_{split} must be "
                                 f"torch tensors, got {type(x).__name__} and {type(y).__name__}")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(f"data set {self.name!r}: x_{split} has {len(x)} examples and "
                                 f"y_{split} {len(y)}; they must match and be non-empty")
            if y.dtype != torch.int64:
                raise ValueError(f"data set {self.name!r}: y_{split} must be int64 class/token ids, "
                                 f"got {y.dtype}")
            if self.task is Task.LM and (x.dtype != torch.int64 or x.shape != y.shape
                                         or x.dim() != 2):
                raise ValueError(f"data set {self.name!r}: task 'lm' needs int64 x_{split} and "
                                 f"y_{split} of the same shape (N, T), got {x.dtype} "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
            if self.task is Task.CLASSIFICATION and (not x.is_floating_point() or y.dim() != 1):
                raise ValueError(f"data set {self.name!r}: task 'classification' needs float "
                                 f"x_{split} and 1-d y_{split}, got {x.dtype} and "
                                 f"{tuple(y.shape)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"data set {self.name!r}: num_classes must be an int >= 2, "
                             f"got {self.num_classes!r}")
        hi = max(int(self.y_train.max()), int(self.y_test.max()))
        lo = min(int(self.y_train.min()), int(self.y_test.min()))
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"data set {self.name!r}: labels span [{lo}, {hi}], outside "
                             f"[0, num_classes={self.num_classes})")

    @property
    def metric(self) -> str:
        """The headline metric: accuracy (higher is better) or perplexity (lower)."""
        return "accuracy" if self.task is Task.CLASSIFICATION else "perplexity"

    def describe(self) -> dict:
        """JSON-ready summary for the saved configuration."""
        return {"name": self.name, "task": self.task.value, "num_classes": self.num_classes,
                "train_examples": len(self.x_train), "test_examples": len(self.x_test),
                "example_shape": list(self.x_train.shape[1:]), **self.info}


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------
def load_digits_dataset(*, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits, split by ``seed``, standardized.

    x = (pixels - mean_train) / std_train per pixel (std 0 -> 1), shape (N, 1, 8, 8).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:   # an optional dependency ("experiments" extra)
        raise ValueError("the digits data set needs scikit-learn: "
                         "pip install 'mixprec[experiments]'") from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(dim=0, keepdim=True)
    std = x[train].std(dim=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))   # always-blank corner pixels
    x = (x - mean) / std
    return Dataset("digits", Task.CLASSIFICATION, x[train], y[train], x[test], y[test], 10,
                   info={"source": "sklearn.datasets.load_digits", "split_seed": seed,
                         "test_fraction": test_fraction})


# --------------------------------------------------------------------------------------
# text: the standard library's own source
# --------------------------------------------------------------------------------------
def stdlib_corpus(max_bytes: int = 320_000) -> tuple[bytes, list[str]]:
    """The bytes of the standard library's top-level ``*.py`` files, sorted by name and
    concatenated until ``max_bytes``; returns (bytes, file names used).

    The directory is that of the ``os`` module, so the corpus ships with Python itself.
    """
    if max_bytes < 1024:
        raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
    root = Path(os.__file__).resolve().parent
    chunks, names, size = [], [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        take = data[: max_bytes - size]
        chunks.append(take)
        names.append(path.name)
        size += len(take)
        if size >= max_bytes:
            break
    if size == 0:
        raise ValueError(f"no *.py files found under {root}")
    return b"".join(chunks), names


def load_text_dataset(*, context: int = 64, max_bytes: int = 320_000,
                      test_fraction: float = 0.1, max_test_windows: int = 256) -> Dataset:
    """Byte-level language modelling on :func:`stdlib_corpus` (vocabulary of 256 bytes).

    The last ``test_fraction`` of the corpus is held out.  Examples are non-overlapping
    windows: x = bytes[i : i+T], y = bytes[i+1 : i+T+1] with i = k*T.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2, got {context}")
    corpus, names = stdlib_corpus(max_bytes)
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    cut = int(len(tokens) * (1.0 - test_fraction))

    def windows(t: torch.Tensor, limit=None) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(t) - 1) // context
        if limit is not None:
            n = min(n, limit)
        if n < 1:
            raise ValueError(f"text split of {len(t)} bytes is shorter than context {context}")
        x = t[: n * context].view(n, context)
        y = t[1: n * context + 1].view(n, context)
        return x.clone(), y.clone()

    x_train, y_train = windows(tokens[:cut])
    x_test, y_test = windows(tokens[cut:], max_test_windows)
    info = {"source": "python standard library *.py (directory of the os module)",
            "files": len(names), "first_file": names[0], "last_file": names[-1],
            "bytes": len(corpus), "sha256": hashlib.sha256(corpus).hexdigest(),
            "context": context}
    return Dataset("stdlib-text", Task.LM, x_train, y_train, x_test, y_test, 256, info=info)


# --------------------------------------------------------------------------------------
# batches: the same order for every recipe
# --------------------------------------------------------------------------------------
def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per pass over n examples (the last batch may be short)."""
    return -(-n // batch_size)


def epoch_order(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a permutation that depends only on
    (seed, epoch), so every recipe sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                    seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches, epoch after epoch (see :func:`epoch_order`).

    ``start`` skips that many batches: batch k is batch k % steps_per_epoch of epoch
    k // steps_per_epoch, so a resumed run sees the batches it would have seen.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if start < 0:
        raise ValueError(f"start must be at least 0, got {start}")
    epoch, skip = divmod(start, steps_per_epoch(len(x), batch_size))
    while True:
        for idx in epoch_order(len(x), seed=seed, epoch=epoch).split(batch_size)[skip:]:
            yield x[idx], y[idx]
        epoch, skip = epoch + 1, 0
