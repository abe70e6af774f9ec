"""Projector / predictor MLP heads and the encoder wrapper."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers


def mlp(dims: Sequence[int], input_dim: int, batch_norm: bool = False,
        last_batch_norm: bool = False, activation: str = "relu",
        name: str = "mlp", synchronized: bool = False) -> keras.Model:
    """Dense -> [BN] -> act ... -> Dense(dims[-1]) -> [BN].

    E.g. SimMatch/ASCL projector ``mlp([2048, 128], d)``; PAWS projector
    ``mlp([h, h, out], d, batch_norm=True)``; BYOL predictor
    ``mlp([512, 128], d, batch_norm=True)``. Input [B, input_dim] -> [B, dims[-1]].
    ``synchronized``: BN statistics over the global batch under a strategy.
    """
    x = inp = keras.Input(shape=(input_dim,))
    for i, d in enumerate(dims):
        last = i == len(dims) - 1
        x = layers.Dense(d, use_bias=not (batch_norm and not last) and not (last and last_batch_norm),
                         name=f"dense{i}")(x)
        if (batch_norm and not last) or (last and last_batch_norm):
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=synchronized,
                                          name=f"bn{i}")(x)
        if not last:
            x = layers.Activation(activation)(x)
    return keras.Model(inp, x, name=name)


def encoder(backbone: keras.Model, mean: Sequence[float], std: Sequence[float],
            name: str = "encoder") -> keras.Model:
    """Images in [0, 1] -> (x - mean) / std -> backbone -> features [B, D].

    The normalisation lives in the encoder so that exported models and the
    training pipeline cannot disagree on it.
    """
    inp = keras.Input(shape=backbone.input_shape[1:])
    norm = layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")
    return keras.Model(inp, backbone(norm(inp)), name=name)


def accept_any_image_size(model: keras.Model) -> keras.Model:
    """Lets a convolutional model built for one image size take others (PAWS's
    multi-crop: 32 px global and 18 px local views through one encoder).

    Keras checks a functional model's declared input shape on every call; this
    relaxes the check of ``model`` and every model nested in it to "rank 4 with
    the same channels". The declared shape (what export resizes to) is kept.
    Valid for models whose layers do not depend on the spatial size (convolutions,
    normalisation, global pooling). Returns ``model``, changed in place.
    """
    channels = model.input_shape[-1]
    spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})
    for m in [model] + [layer for layer in model._flatten_layers()
                        if isinstance(layer, keras.Model)]:
        m.input_spec = spec
    return model
