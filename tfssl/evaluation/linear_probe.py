"""Linear probe: a softmax classifier trained on frozen, unaugmented features."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfssl.evaluation.knn import extract


def fit_linear(train_x: np.ndarray, train_y: np.ndarray, num_classes: int,
               steps: int = 500, learning_rate: float = 0.1,
               weight_decay: float = 1e-4, seed: int = 0):
    """Multinomial logistic regression by full-batch Adam on standardised features.

    Minimises ``mean_i CE(y_i, W x_i + b) + wd * ||W||^2``.
    Returns (W [D, C], b [C], mu [D], sigma [D]) where inputs are standardised
    by mu/sigma of the training features."""
    mu = train_x.mean(0)
    sigma = train_x.std(0) + 1e-6
    x = tf.constant((train_x - mu) / sigma, tf.float32)
    y = tf.constant(train_y, tf.int64)
    rng = np.random.default_rng(seed)
    w = tf.Variable(rng.normal(0, 0.01, [x.shape[1], num_classes]).astype(np.float32))
    b = tf.Variable(tf.zeros([num_classes]))
    opt = keras.optimizers.Adam(learning_rate)
    opt.build([w, b])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = tf.matmul(x, w) + b
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            loss += weight_decay * tf.reduce_sum(w * w)
        opt.apply(tape.gradient(loss, [w, b]), [w, b])
        return loss

    for _ in range(steps):
        step()
    return w.numpy(), b.numpy(), mu, sigma


def linear_probe_accuracy(encoder: keras.Model, train: tf.data.Dataset,
                          test: tf.data.Dataset, num_classes: int, **kwargs) -> float:
    """Top-1 test accuracy of a linear classifier fit on ``train``'s frozen features."""
    tx, ty = extract(encoder, train)
    vx, vy = extract(encoder, test)
    w, b, mu, sigma = fit_linear(tx, ty, num_classes, **kwargs)
    pred = np.argmax(((vx - mu) / sigma) @ w + b, axis=1)
    return float(np.mean(pred == vy))
