"""Weighted kNN classification on cosine similarity (Wu et al. 2018), streamed.

The query features are held (the test set); the bank (labeled train set) is
streamed batch by batch and only the running top-k similarities and labels
per query are kept, so memory is O(Q * (D + k)), not O(N_bank * D).

Prediction: ``score_c(q) = sum_{j in topk(q)} exp(s_qj / t) * 1[y_j = c]``.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf


_FEATURE_FNS = weakref.WeakKeyDictionary()


def _features_fn(encoder: keras.Model):
    """One compiled feature function per encoder, reused across evaluations."""
    if encoder not in _FEATURE_FNS:
        @tf.function(reduce_retracing=True)
        def f(images):
            return tf.math.l2_normalize(tf.cast(encoder(images, training=False), tf.float32), -1)
        _FEATURE_FNS[encoder] = f
    return _FEATURE_FNS[encoder]


def extract(encoder: keras.Model, dataset: tf.data.Dataset, features_fn=None):
    """L2-normalised features and labels of an evaluation dataset (in memory).

    ``features_fn`` (images -> normalised features) replaces the encoder's
    features when given (PAWS's projection embeddings).

    Returns: (features float32 [N, D], labels int64 [N])."""
    f = features_fn or _features_fn(encoder)
    feats, labels = [], []
    for batch in dataset:
        feats.append(f(batch["image"]).numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


@tf.function
def _merge_topk(top_s, top_y, sims, labels, k):
    s = tf.concat([top_s, sims], axis=1)
    y = tf.concat([top_y, tf.broadcast_to(labels[None, :], tf.shape(sims))], axis=1)
    k = tf.minimum(k, tf.shape(s)[1])
    vals, idx = tf.math.top_k(s, k=k)
    return vals, tf.gather(y, idx, batch_dims=1)


def knn_predict(query: np.ndarray, bank_batches, num_classes: int, k: int = 200,
                t: float = 0.1) -> np.ndarray:
    """Class scores [Q, C] for L2-normalised ``query`` [Q, D] against a stream of
    ``(bank_features [b, D], bank_labels [b])`` batches."""
    q = tf.constant(query, tf.float32)
    top_s = tf.zeros([q.shape[0], 0], tf.float32)
    top_y = tf.zeros([q.shape[0], 0], tf.int64)
    for feats, labels in bank_batches:
        sims = tf.matmul(q, tf.constant(feats, tf.float32), transpose_b=True)
        top_s, top_y = _merge_topk(top_s, top_y, sims, tf.constant(labels, tf.int64),
                                   tf.constant(k))
    weights = tf.exp(top_s / t)
    scores = tf.reduce_sum(weights[..., None] * tf.one_hot(top_y, num_classes), axis=1)
    return scores.numpy()


def knn_accuracy(encoder: keras.Model, bank: tf.data.Dataset, queries: tf.data.Dataset,
                 num_classes: int, k: int = 200, t: float = 0.1) -> float:
    """Top-1 kNN accuracy of ``queries`` against the labeled ``bank`` (both
    evaluation datasets of ``{"image", "label"}`` batches)."""
    qf, qy = extract(encoder, queries)
    f = _features_fn(encoder)
    stream = ((f(b["image"]).numpy(), b["label"].numpy()) for b in bank)
    scores = knn_predict(qf, stream, num_classes, k, t)
    return float(np.mean(np.argmax(scores, 1) == qy))
