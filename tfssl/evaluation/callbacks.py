"""Training-time evaluation callbacks."""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tfssl.evaluation.knn import knn_accuracy
from tfssl.evaluation.linear_probe import linear_probe_accuracy


class KNNMonitor(keras.callbacks.Callback):
    """Adds ``knn_top1`` (cosine kNN of the test set against the labeled train
    set, on encoder features) to the epoch logs every ``every`` epochs.

    Place it before TensorBoard/CSV callbacks so they record the value.
    """

    def __init__(self, bank: tf.data.Dataset, queries: tf.data.Dataset, num_classes: int,
                 k: int = 200, t: float = 0.1, every: int = 1, use_ema: bool = False):
        super().__init__()
        self.bank, self.queries = bank, queries
        self.num_classes, self.k, self.t, self.every = num_classes, k, t, every
        self.use_ema = use_ema

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        ctx = self.model.ema_applied() if self.use_ema else contextlib.nullcontext()
        with ctx:
            logs["knn_top1"] = knn_accuracy(self.model.encoder, self.bank, self.queries,
                                            self.num_classes, self.k, self.t)



class TestAccuracy(keras.callbacks.Callback):
    """Adds ``val_top1`` / ``val_loss`` from ``model.evaluate(test)`` every
    ``every`` epochs, optionally with the EMA weights loaded (Keras's own
    ``validation_data`` cannot swap weights)."""

    def __init__(self, test: tf.data.Dataset, every: int = 1, use_ema: bool = True):
        super().__init__()
        self.test, self.every, self.use_ema = test, every, use_ema

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        ctx = self.model.ema_applied() if self.use_ema else contextlib.nullcontext()
        with ctx:
            res = self.model.evaluate(self.test, verbose=0, return_dict=True)
        logs["val_top1"] = float(res["top1"])
        logs["val_loss"] = float(res["loss"])


class LinearProbeMonitor(keras.callbacks.Callback):
    """Adds ``linear_probe_top1`` (a linear classifier fit on the frozen,
    unaugmented features of ``train``, scored on ``test``) every ``every``
    epochs: the per-epoch accuracy of methods without a classifier."""

    def __init__(self, train: tf.data.Dataset, test: tf.data.Dataset, num_classes: int,
                 every: int = 1, steps: int = 300, use_ema: bool = False):
        super().__init__()
        self.train, self.test, self.num_classes = train, test, num_classes
        self.every, self.steps, self.use_ema = every, steps, use_ema

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        ctx = self.model.ema_applied() if self.use_ema else contextlib.nullcontext()
        with ctx:
            logs["linear_probe_top1"] = linear_probe_accuracy(
                self.model.encoder, self.train, self.test, self.num_classes, steps=self.steps)
