"""Class-stratified support batches (PAWS), in ``tf.data``.

Each batch holds ``classes_per_batch`` classes x ``imgs_per_class`` labeled
images, laid out class-interleaved so that the fixed label matrix of
``tfssl.ops.paws.support_labels`` labels it: with G classes in a chunk, rows
``[c_1, .., c_G, c_1, .., c_G, ...]`` (``imgs_per_class`` rounds). With
``num_chunks = R`` (different classes per replica) the batch is R such chunks
of G = classes_per_batch / R classes each, chunk r going to replica r (Keras
splits a global batch across replicas in order). Columns are the i-th sampled
class of the step, not dataset class ids; which classes are drawn, and which
images of each, changes every batch.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from tfssl import augment
from tfssl.data.shards import shard_slice
from tfssl.data.sources import Source

AUTOTUNE = tf.data.AUTOTUNE


def labeled_images(source: Source, labeled_ids: np.ndarray, size: int = None) -> np.ndarray:
    """The labeled images as one uint8 array [n_l, H, W, C] (random access for
    the sampler). In-memory sources are indexed; other sources are read once
    (a pass over the train set), resized to ``size`` squares if their images
    vary in size."""
    labeled_ids = np.asarray(labeled_ids, np.int64)
    if source.train_arrays is not None:
        return source.train_arrays[0][labeled_ids]
    out = [None] * len(labeled_ids)
    where = {int(i): k for k, i in enumerate(labeled_ids)}
    for e in source.subset(labeled_ids).as_numpy_iterator():  # in train-set order
        img = e["image"]
        if size is not None and img.shape[:2] != (size, size):
            img = tf.cast(tf.clip_by_value(tf.image.resize(img, [size, size], antialias=True),
                                           0, 255), tf.uint8).numpy()
        out[where[int(e["index"])]] = img
    if any(o is None for o in out):
        raise ValueError("some labeled ids are not in the train set.")
    return np.stack(out)


def support_indices(labels: np.ndarray, classes_per_batch: int, imgs_per_class: int,
                    num_chunks: int = 1, replacement: bool = False, seed: int = 0) -> tf.data.Dataset:
    """An infinite stream of int64 [classes_per_batch * imgs_per_class] positions
    into ``labels`` (the labeled set), in the class-interleaved chunk layout.

    Batch k draws (stateless, from ``(seed, k)``) a random ordered subset of
    ``classes_per_batch`` classes, then ``imgs_per_class`` distinct images of
    each (or drawn with replacement if ``replacement``).

    Raises:
      ValueError: fewer classes with labeled images than ``classes_per_batch``;
        a class with fewer labeled images than ``imgs_per_class`` (unless
        ``replacement``); ``classes_per_batch`` not divisible by ``num_chunks``.
    """
    labels = np.asarray(labels, np.int64)
    classes = np.unique(labels[labels >= 0])
    if classes_per_batch < 1 or imgs_per_class < 1:
        raise ValueError("classes_per_batch and imgs_per_class must be >= 1.")
    if classes_per_batch > len(classes):
        raise ValueError(f"the support batch asks for classes_per_batch={classes_per_batch} "
                         f"classes, but the labeled set has only {len(classes)}.")
    if num_chunks < 1 or classes_per_batch % num_chunks:
        raise ValueError(f"classes_per_batch={classes_per_batch} does not divide over "
                         f"{num_chunks} replicas (different classes per replica).")
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = np.array([len(m) for m in members])
    if not replacement and counts.min() < imgs_per_class:
        short = int(classes[np.argmin(counts)])
        raise ValueError(f"class {short} has {counts.min()} labeled image(s), fewer than "
                         f"imgs_per_class={imgs_per_class}: lower it, label more images, or "
                         "sample with replacement.")
    table = np.full([len(classes), counts.max()], -1, np.int64)
    for i, m in enumerate(members):
        table[i, :len(m)] = m
    table_t, counts_t = tf.constant(table), tf.constant(counts, tf.int64)
    n_cls, width = len(classes), int(counts.max())
    c, s, g = classes_per_batch, imgs_per_class, classes_per_batch // num_chunks

    def draw(k):
        key = tf.stack([tf.constant(seed, tf.int64), k])
        chosen = tf.argsort(tf.random.stateless_uniform([n_cls], key))[:c]
        rows = tf.gather(table_t, chosen)                       # [c, width]
        if replacement:
            u = tf.random.stateless_uniform([c, s], key + [1, 0], dtype=tf.float64)
            n = tf.cast(tf.gather(counts_t, chosen), tf.float64)[:, None]
            pos = tf.cast(tf.floor(u * n), tf.int32)
        else:
            u = tf.random.stateless_uniform([c, width], key + [1, 0])
            u = tf.where(rows >= 0, u, 2.0)                     # padding sorts last
            pos = tf.argsort(u, axis=1)[:, :s]
        ids = tf.gather(rows, pos, batch_dims=1)                # [c, s]: class-major
        # Chunk r: its g classes interleaved, s rounds: [chunks, g, s] -> [chunks, s, g].
        ids = tf.transpose(tf.reshape(ids, [num_chunks, g, s]), [0, 2, 1])
        return tf.reshape(ids, [c * s])

    return tf.data.Dataset.counter().map(draw)


def support_stream(source: Source, labeled_ids: np.ndarray, views: Dict[str, augment.View],
                   classes_per_batch: int, imgs_per_class: int, num_chunks: int = 1,
                   replacement: bool = False, seed: int = 0,
                   deterministic: bool = False,
                   input_context: Optional[tf.distribute.InputContext] = None
                   ) -> tf.data.Dataset:
    """Support batches ``{<view>: float32 [m, S, S, C], ..., "label": int64 [m],
    "index": int64 [m]}`` with ``m = classes_per_batch * imgs_per_class`` rows in
    the layout of the module docstring; every view is applied to the same
    images (PAWS's 2 views per support image).

    Args:
      source: the dataset source.
      labeled_ids: int [n_l] dataset indices of the labeled images.
      views: view name -> view fn (e.g. ``view_0``, ``view_1``).
      classes_per_batch, imgs_per_class: C' and images per class (GLOBAL).
      num_chunks: replicas with different classes each (1: every replica gets
        every class of the batch; then ``imgs_per_class`` rounds are split).
      replacement: sample images with replacement (classes smaller than
        ``imgs_per_class`` are then allowed).
      seed: the draws are a function of (seed, batch number).
      deterministic: apply views one image at a time (reproducible).
      input_context: build only this input pipeline's rows of every batch,
        batched per replica (``tfssl.data.pipeline`` module docstring).
    """
    labeled_ids = np.asarray(labeled_ids, np.int64)
    labels = np.asarray(source.train_labels)[labeled_ids]
    positions = support_indices(labels, classes_per_batch, imgs_per_class, num_chunks,
                                replacement, seed)
    images = labeled_images(source, labeled_ids, source.image_shape[0])
    # Graph constants are limited to 2 GB: larger labeled sets are read from a variable.
    images_t = tf.constant(images) if images.nbytes < (1 << 30) else tf.Variable(
        images, trainable=False)
    labels_t, ids_t = tf.constant(labels, tf.int64), tf.constant(labeled_ids)

    def apply(pos):
        image = tf.gather(images_t, pos)
        out = {name: view(image) for name, view in views.items()}
        out["label"] = tf.gather(labels_t, pos)
        out["index"] = tf.gather(ids_t, pos)
        return out

    m = classes_per_batch * imgs_per_class
    first, rows, per_replica = shard_slice(m, input_context)
    return (positions.map(lambda p: p[first:first + rows]).unbatch()
            .map(apply, num_parallel_calls=1 if deterministic else AUTOTUNE, deterministic=True)
            .batch(per_replica, drop_remainder=True))
