"""Semi-supervised splits: which train images keep their labels."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np


def labeled_split(labels: np.ndarray, num_classes: int,
                  labels_per_class: Optional[int] = None,
                  label_fraction: Optional[float] = None,
                  seed: int = 0) -> np.ndarray:
    """Class-balanced labeled ids, deterministic from ``seed``.

    Takes the same number n of images from every class: ``labels_per_class``,
    or ``round(label_fraction * N_labeled / C)``. Within class c the ids are
    the first n of a permutation drawn by ``numpy.random.default_rng(seed)``,
    classes visited in order 0..C-1.

    Args:
      labels: int [N] train labels; negative entries (unknown) are never chosen.
      num_classes: C.
      labels_per_class: n, exclusive with ``label_fraction``.
      label_fraction: fraction of the labeled train set in (0, 1].
      seed: the run's ``--seed``.

    Returns:
      Sorted int64 [C * n] dataset indices.

    Raises:
      ValueError: both or neither of n / fraction, n < 1, or a class with
        fewer than n images (names the class and its count).
    """
    labels = np.asarray(labels)
    if (labels_per_class is None) == (label_fraction is None):
        raise ValueError("Give exactly one of --labels_per_class and --label_fraction.")
    known = labels >= 0
    if label_fraction is not None:
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"--label_fraction must be in (0, 1], got {label_fraction}.")
        labels_per_class = int(round(label_fraction * known.sum() / num_classes))
    if labels_per_class < 1:
        raise ValueError(f"--labels_per_class must be >= 1, got {labels_per_class}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < labels_per_class:
            raise ValueError(
                f"--labels_per_class={labels_per_class} is more than class {c} has "
                f"({len(idx)} train images); the largest value every class allows is "
                f"{min(int((labels == k).sum()) for k in range(num_classes))}.")
        chosen.append(rng.permutation(idx)[:labels_per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def unlabeled_ids(num_train: int, labeled: np.ndarray, include_labeled: bool = True,
                  num_extra: int = 0) -> np.ndarray:
    """Indices of the unlabeled stream: all train images (the papers' default)
    or those not labeled (MixMatch's convention), then the extra unlabeled ones."""
    ids = np.arange(num_train, dtype=np.int64)
    if not include_labeled:
        ids = np.setdiff1d(ids, labeled)
    return np.concatenate([ids, np.arange(num_train, num_train + num_extra, dtype=np.int64)])


def write_labeled_ids(workdir: str, labeled: np.ndarray, labels: np.ndarray, seed: int) -> str:
    """Writes ``<workdir>/labeled_ids.json`` so the run's split is auditable."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "labeled_ids.json")
    with open(path, "w") as f:
        json.dump({"seed": int(seed), "indices": [int(i) for i in labeled],
                   "labels": [int(labels[i]) for i in labeled]}, f)
    return path
