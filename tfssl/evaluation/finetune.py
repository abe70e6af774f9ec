"""Fine-tuning on the labeled set (PAWS's evaluation protocol).

A copy of the trained encoder, then the FIRST layer of the projection head
(Dense -> BN -> ReLU, weights kept), then a new zero-initialised linear
output; every weight is trained with cross-entropy on augmented labeled
images. The trained model itself is not changed.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import keras
import tensorflow as tf


def finetune_model(encoder: keras.Model, projector: keras.Model,
                   num_classes: int) -> Tuple[keras.Model, keras.Model]:
    """(encoder copy, head) where head = projector's dense0 -> bn0 -> ReLU (copied)
    -> Dense(num_classes, zeros). Feature dim -> logits."""
    enc = keras.models.clone_model(encoder)
    enc.set_weights(encoder.get_weights())
    d = projector.input_shape[-1]
    dense0, bn0 = projector.get_layer("dense0"), projector.get_layer("bn0")
    x = inp = keras.Input(shape=(d,))
    first = keras.layers.Dense(dense0.units, use_bias=dense0.use_bias, name="dense0")
    bn = keras.layers.BatchNormalization(momentum=bn0.momentum, epsilon=bn0.epsilon, name="bn0")
    x = keras.layers.ReLU()(bn(first(x)))
    out = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="output")(x)
    head = keras.Model(inp, out, name="finetune_head")
    first.set_weights(dense0.get_weights())
    bn.set_weights(bn0.get_weights())
    return enc, head


def fine_tune(encoder: keras.Model, projector: keras.Model, labeled: tf.data.Dataset,
             num_labeled: int, test: tf.data.Dataset, num_classes: int, epochs: int = 30,
             batch_size: int = 64, learning_rate: float = 0.05, weight_decay: float = 5e-4,
             view: str = "weak", verbose: int = 0) -> Dict:
    """Fine-tunes a copy; returns ``{"top1": test accuracy, "encoder", "head"}``.

    Args:
      encoder, projector: the trained PAWS networks (copied, not changed).
      labeled: infinite stream of ``{"labeled": {view: [batch_size, ...], "label"}}``
        (``tfssl.data.semi_supervised`` with the labeled views only).
      num_labeled: labeled images (steps per epoch = ceil(num_labeled / batch_size)).
      test: evaluation batches ``{"image", "label"}``.
      epochs, batch_size, learning_rate, weight_decay: SGD (Nesterov, momentum
        0.9, cosine decay; no decay of biases / BN parameters).
      view: which labeled view to train on.
    """
    enc, head = finetune_model(encoder, projector, num_classes)
    inp = keras.Input(shape=encoder.input_shape[1:])
    clf = keras.Model(inp, head(enc(inp)), name="finetuned")
    steps = epochs * max(1, math.ceil(num_labeled / batch_size))
    opt = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(learning_rate, steps),
                               momentum=0.9, nesterov=True, weight_decay=weight_decay or None)
    if weight_decay:
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    clf.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
    train = labeled.map(lambda e: (e["labeled"][view], e["labeled"]["label"]))
    clf.fit(train, epochs=1, steps_per_epoch=steps, verbose=verbose)
    res = clf.evaluate(test.map(lambda e: (e["image"], e["label"])), verbose=0, return_dict=True)
    return {"top1": float(res["top1"]), "encoder": enc, "head": head}
