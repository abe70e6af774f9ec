"""Training-time evaluation callbacks: each adds a metric to the epoch logs
every ``every`` epochs (place them before TensorBoard/CSV callbacks so those
record it), optionally with the model's EMA weights loaded."""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tfssl.evaluation.knn import knn_accuracy
from tfssl.evaluation.linear_probe import linear_probe_accuracy


class _EpochEvaluation(keras.callbacks.Callback):
    def __init__(self, every: int = 1, use_ema: bool = False):
        super().__init__()
        self.every, self.use_ema = every, use_ema

    def evaluate(self) -> dict:
        raise NotImplementedError  # abstract: each monitor computes its metrics

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        ctx = self.model.ema_applied() if self.use_ema else contextlib.nullcontext()
        with ctx:
            logs.update(self.evaluate())


class KNNMonitor(_EpochEvaluation):
    """``knn_top1``: cosine kNN of the test set against the labeled train set,
    on encoder features (k neighbours, temperature t)."""

    def __init__(self, bank: tf.data.Dataset, queries: tf.data.Dataset, num_classes: int,
                 k: int = 200, t: float = 0.1, every: int = 1, use_ema: bool = False):
        super().__init__(every, use_ema)
        self.bank, self.queries = bank, queries
        self.num_classes, self.k, self.t = num_classes, k, t

    def evaluate(self):
        return {"knn_top1": knn_accuracy(self.model.encoder, self.bank, self.queries,
                                         self.num_classes, self.k, self.t)}


class TestAccuracy(_EpochEvaluation):
    """``val_top1`` / ``val_loss`` from ``model.evaluate(test)``; unlike Keras's
    ``validation_data`` it can load the EMA weights first."""

    def __init__(self, test: tf.data.Dataset, every: int = 1, use_ema: bool = True):
        super().__init__(every, use_ema)
        self.test = test

    def evaluate(self):
        res = self.model.evaluate(self.test, verbose=0, return_dict=True)
        return {"val_top1": float(res["top1"]), "val_loss": float(res["loss"])}


class LinearProbeMonitor(_EpochEvaluation):
    """``linear_probe_top1``: a linear classifier fit on the frozen, unaugmented
    features of ``train``, scored on ``test`` (methods without a classifier)."""

    def __init__(self, train: tf.data.Dataset, test: tf.data.Dataset, num_classes: int,
                 every: int = 1, steps: int = 300, use_ema: bool = False):
        super().__init__(every, use_ema)
        self.train, self.test, self.num_classes, self.steps = train, test, num_classes, steps

    def evaluate(self):
        return {"linear_probe_top1": linear_probe_accuracy(
            self.model.encoder, self.train, self.test, self.num_classes, steps=self.steps)}
