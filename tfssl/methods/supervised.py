"""The labeled-only baseline: the yardstick every semi-supervised method must beat."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tfssl.methods.base import SSLModel


@keras.saving.register_keras_serializable(package="tfssl")
class Supervised(SSLModel):
    """Cross-entropy on the labeled batch only.

    Data: ``{"labeled": {"weak": float [B, H, W, C], "label": int [B], ...}}``
    (an ``unlabeled`` entry, if present, is ignored), or Keras's
    ``fit(x=images, y=labels)`` with images in [0, 1].

    Loss: ``L_x = 1/B sum_b H(onehot_eps(y_b), softmax(f(x_b)))`` with label
    smoothing eps.

    Args:
      encoder: images -> features model.
      num_classes: C.
      label_smoothing: eps in [0, 1).
      ema_decay: optional EMA of weights for evaluation (see ``SSLModel``).
    """

    def __init__(self, encoder: keras.Model, num_classes: int, label_smoothing: float = 0.0,
                 ema_decay: Optional[float] = None, **kwargs):
        super().__init__(encoder, num_classes=num_classes, ema_decay=ema_decay, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing
        self.loss_x = self.tracker("loss_x")
        self.train_top1 = self.tracker("train_top1")
        self.init_ema()

    def train_step(self, data):
        batch = self.unpack(data)
        if isinstance(batch, dict) and "labeled" in batch:
            x, y = batch["labeled"]["weak"], batch["labeled"]["label"]
        elif isinstance(batch, dict) and {"image", "label"} <= set(batch):
            x, y = batch["image"], batch["label"]  # fit(x=images, y=labels)
        else:
            raise ValueError("Supervised.fit needs labeled images: fit(x=images, y=labels), "
                             "or batches of {'labeled': {'weak': images, 'label': labels}}.")
        with tf.GradientTape() as tape:
            logits = tf.cast(self(x, training=True), tf.float32)
            targets = tf.one_hot(y, self.num_classes)
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=self.label_smoothing))
        self.loss_x.update_state(loss)
        self.train_top1.update_state(
            tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(y, tf.int64)), tf.float32))
        self.apply_loss(tape, loss)
        return self.train_results()

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
