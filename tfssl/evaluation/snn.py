"""Soft nearest-neighbour (SNN) classification (PAWS's evaluation), streamed.

``p(y | x) = sum_j softmax_j(e(x) . e(s_j) / tau) onehot(y_j)`` over ALL labeled
images s_j, with ``e`` the L2-normalised embedding. The queries (test set) are
held; the labeled set is streamed batch by batch with an online softmax (a
running max, normaliser and class-weighted sum per query), so memory is
O(Q * (D + C)), never O(Q * N_labeled) or O(N_labeled * D).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tfssl.evaluation.callbacks import _EpochEvaluation
from tfssl.evaluation.knn import extract


@tf.function(reduce_retracing=True)
def _merge(run_max, run_sum, run_cls, q, feats, onehot, t):
    logits = tf.matmul(q, feats, transpose_b=True) / t         # [Q, b]
    new_max = tf.maximum(run_max, tf.reduce_max(logits, axis=1))
    scale = tf.exp(run_max - new_max)
    w = tf.exp(logits - new_max[:, None])
    return (new_max, run_sum * scale + tf.reduce_sum(w, 1),
            run_cls * scale[:, None] + tf.matmul(w, onehot))


def snn_predict(query: np.ndarray, support_batches, num_classes: int,
                temperature: float = 0.1) -> np.ndarray:
    """Class distributions [Q, C] of L2-normalised ``query`` [Q, D] against a
    stream of ``(support_embeddings [b, D] (normalised), labels [b])`` batches."""
    q = tf.constant(query, tf.float32)
    n = q.shape[0]
    run_max = tf.fill([n], -np.inf)
    run_sum = tf.zeros([n])
    run_cls = tf.zeros([n, num_classes])
    t = tf.constant(temperature, tf.float32)
    seen = 0
    for feats, labels in support_batches:
        onehot = tf.one_hot(tf.constant(labels, tf.int64), num_classes)
        run_max, run_sum, run_cls = _merge(run_max, run_sum, run_cls, q,
                                           tf.constant(feats, tf.float32), onehot, t)
        seen += len(labels)
    if not seen:
        raise ValueError("the SNN classifier got no labeled images.")
    return (run_cls / run_sum[:, None]).numpy()


_EMBED_FNS = weakref.WeakKeyDictionary()


def embedding_fn(model) -> Callable:
    """Images -> L2-normalised projection ``h`` of a PAWS model, inference mode
    (one compiled function per model, reused across evaluations)."""
    if model not in _EMBED_FNS:
        @tf.function(reduce_retracing=True)
        def f(images):
            h, _ = model.embed(images, training=False)
            return tf.math.l2_normalize(h, -1)
        _EMBED_FNS[model] = f
    return _EMBED_FNS[model]


def snn_accuracy(embed: Callable, labeled: tf.data.Dataset, test: tf.data.Dataset,
                 num_classes: int, temperature: float = 0.1) -> float:
    """Top-1 accuracy on ``test`` of the SNN classifier whose supports are every
    image of ``labeled`` (both evaluation datasets of ``{"image", "label"}``)."""
    qf, qy = extract(None, test, embed)
    stream = ((embed(b["image"]).numpy(), b["label"].numpy()) for b in labeled)
    probs = snn_predict(qf, stream, num_classes, temperature)
    return float(np.mean(np.argmax(probs, 1) == qy))


class SNNMonitor(_EpochEvaluation):
    """``snn_top1`` in the epoch logs: SNN accuracy of the test set with the
    labeled set as supports (PAWS)."""

    def __init__(self, labeled: tf.data.Dataset, test: tf.data.Dataset, num_classes: int,
                 temperature: float = 0.1, every: int = 1, use_ema: bool = False):
        super().__init__(every, use_ema)
        self.labeled, self.test = labeled, test
        self.num_classes, self.temperature = num_classes, temperature
        self._embed = None

    def evaluate(self):
        if self._embed is None:
            self._embed = embedding_fn(self.model)
        return {"snn_top1": snn_accuracy(self._embed, self.labeled, self.test,
                                         self.num_classes, self.temperature)}


@keras.saving.register_keras_serializable(package="tfssl")
class SNNHead(keras.layers.Layer):
    """Embeddings [B, D] -> SNN class probabilities [B, C] over stored supports
    (non-trainable weights: normalised embeddings [N, D] and one-hot labels [N, C]),
    so that a SavedModel classifies with no other file."""

    def __init__(self, supports: np.ndarray, labels: np.ndarray, num_classes: int,
                 temperature: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        supports = np.asarray(supports, np.float32)
        self.temperature, self.num_classes = float(temperature), int(num_classes)
        self.supports = self.add_weight(shape=supports.shape, trainable=False,
                                        initializer="zeros", name="supports")
        self.supports.assign(supports)
        self.support_labels = self.add_weight(shape=(len(labels), num_classes), trainable=False,
                                              initializer="zeros", name="support_labels")
        self.support_labels.assign(np.eye(num_classes, dtype=np.float32)[np.asarray(labels)])

    def call(self, embeddings):
        e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), -1)
        w = tf.nn.softmax(tf.matmul(e, self.supports, transpose_b=True) / self.temperature, -1)
        return tf.matmul(w, self.support_labels)


def build_snn_head(model, labeled: tf.data.Dataset, num_classes: int,
                   temperature: float = 0.1, use_ema: bool = False) -> SNNHead:
    """An ``SNNHead`` holding the embeddings of every image of ``labeled``."""
    with (model.ema_applied() if use_ema else contextlib.nullcontext()):
        feats, labels = extract(None, labeled, embedding_fn(model))
    return SNNHead(feats, labels, num_classes, temperature, name="snn_head")
