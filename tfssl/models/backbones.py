"""Backbones: functional Keras models from images to a feature vector.

Every backbone maps float32 [B, H, W, C] (already normalised) to [B, D] after
global average pooling. ``norm`` picks the normalisation: ``batch`` (per
replica), ``sync_batch`` (statistics over the global batch under a strategy:
what makes N replicas equal one device), or ``none``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import keras
import tensorflow as tf
from keras import layers

NORMS = ("batch", "sync_batch", "ghost_batch", "none")
GHOST_GROUPS = 8  # ghost_batch: ASCL's official split-BN emulates 8 GPUs


@keras.saving.register_keras_serializable(package="tfssl")
class GhostBatchNormalization(layers.Layer):
    """Split (ghost) batch norm: in training, the batch is cut into ``groups``
    equal parts, each normalised with its own mean and variance, as if each part
    sat on its own accelerator (ASCL's official single-GPU code emulates 8 GPUs
    this way). The moving statistics follow the mean over groups of the group
    statistics. Inference uses the moving statistics, as BatchNormalization.

    Input [B, ..., C] with B divisible by ``groups``.
    """

    def __init__(self, groups: int = 8, momentum: float = 0.9, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}.")
        self.groups, self.momentum, self.epsilon = groups, momentum, epsilon

    def build(self, input_shape):
        c = (input_shape[-1],)
        self.gamma = self.add_weight(shape=c, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=c, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=c, initializer="zeros", trainable=False,
                                           name="moving_mean", aggregation="mean")
        self.moving_variance = self.add_weight(shape=c, initializer="ones", trainable=False,
                                               name="moving_variance", aggregation="mean")

    def call(self, x, training=False):
        if not training:
            mean, var = self.moving_mean, self.moving_variance
            return (x - mean) * tf.math.rsqrt(var + self.epsilon) * self.gamma + self.beta
        g = self.groups
        if x.shape[0] is not None and x.shape[0] % g:
            raise ValueError(f"ghost batch norm: batch {x.shape[0]} does not divide into {g} groups.")
        xg = tf.reshape(x, [g, -1] + list(x.shape[1:]))
        axes = list(range(1, len(xg.shape) - 1))
        mean, var = tf.nn.moments(xg, axes=axes, keepdims=True)
        y = tf.reshape((xg - mean) * tf.math.rsqrt(var + self.epsilon), tf.shape(x))
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1 - m) * tf.reshape(
            tf.reduce_mean(mean, 0), [-1]))
        self.moving_variance.assign(m * self.moving_variance + (1 - m) * tf.reshape(
            tf.reduce_mean(var, 0), [-1]))
        return y * self.gamma + self.beta

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "momentum": self.momentum,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfssl")
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's fused kernel
    (``FusedBatchNormV3``; oneDNN's on CPU, cuDNN's on GPU) for 4-D channels-last
    inputs. Keras 3 normalises with separate moment, subtract, multiply ops (and
    as many in the backward pass); one fused op forward and one backward made
    WRN-28-2 training steps 13-33% faster on 2 CPU cores (MixMatch MFU 0.69 ->
    0.78, SimMatch 0.63 -> 0.84, PAWS 0.66 -> 0.88; BENCHMARKS.md).

    Same variables, arguments and results as the Keras layer:
    ``y = gamma (x - mean) / sqrt(var + epsilon) + beta`` with the batch's mean
    and biased variance in training, and
    ``moving <- momentum * moving + (1 - momentum) * batch`` for the mean and
    the biased variance (the kernel returns the unbiased variance
    ``var * n / (n - 1)``, n = B H W; it is scaled back). Epsilon is raised to
    1.001e-5 if smaller, as ``tf.compat.v1.nn.fused_batch_norm`` does (cuDNN's
    floor). Any other case (not 4-D, another axis, synchronized, renorm, a mask,
    no scale or centre, float64) runs the Keras layer unchanged.
    """

    def _fusable(self, inputs, mask):
        return (len(inputs.shape) == 4 and self.axis in (3, -1) and not self.synchronized
                and not self.renorm and mask is None and self.scale and self.center
                and inputs.dtype in (tf.float16, tf.bfloat16, tf.float32))  # the kernel's types

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)  # Keras computes BN in float32 too
        eps = max(float(self.epsilon), 1.001e-5)
        gamma = tf.cast(self.gamma, tf.float32)
        beta = tf.cast(self.beta, tf.float32)
        if training and self.trainable:
            y, mean, var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=eps, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
            shape = tf.shape(x)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            var = var * tf.maximum(n - 1.0, 0.0) / n  # biased, as Keras keeps it
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m
                                        + tf.stop_gradient(var) * (1.0 - m))
        else:
            y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=eps,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=False)
        return tf.cast(y, self.compute_dtype)


def _norm(norm: str, momentum: float = 0.9, epsilon: float = 1e-5, name=None):
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}.")
    if norm == "none":
        return layers.Identity(name=name)
    if norm == "ghost_batch":
        return GhostBatchNormalization(GHOST_GROUPS, momentum=momentum, epsilon=epsilon, name=name)
    if norm == "batch":
        return FusedBatchNormalization(momentum=momentum, epsilon=epsilon, name=name)
    return layers.BatchNormalization(momentum=momentum, epsilon=epsilon, synchronized=True,
                                     name=name)


def _conv(filters, kernel, stride=1, name=None):
    return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=name)


def small_cnn(input_shape: Sequence[int] = (8, 8, 1), width: int = 32,
              norm: str = "batch", name: str = "small_cnn") -> keras.Model:
    """A 4-conv network for tiny images (the digits default): two 3x3 conv-BN-ReLU
    at ``width``, 2x2 max-pool, two at ``2 * width``, global average pool.
    Output: [B, 2 * width]."""
    x = inp = keras.Input(shape=tuple(input_shape))
    for i, f in enumerate([width, width, 2 * width, 2 * width]):
        x = _conv(f, 3, name=f"conv{i}")(x)
        x = _norm(norm, name=f"bn{i}")(x)
        x = layers.ReLU()(x)
        if i == 1:
            x = layers.MaxPool2D(2, padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, x, name=name)


def _basic_block(x, filters, stride, norm, name):
    shortcut = x
    y = _conv(filters, 3, stride, name=f"{name}_conv1")(x)
    y = layers.ReLU()(_norm(norm, name=f"{name}_bn1")(y))
    y = _conv(filters, 3, 1, name=f"{name}_conv2")(y)
    y = _norm(norm, name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, name=f"{name}_down")(x)
        shortcut = _norm(norm, name=f"{name}_down_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def _bottleneck(x, filters, stride, norm, name):
    shortcut = x
    y = _conv(filters, 1, 1, name=f"{name}_conv1")(x)
    y = layers.ReLU()(_norm(norm, name=f"{name}_bn1")(y))
    y = _conv(filters, 3, stride, name=f"{name}_conv2")(y)
    y = layers.ReLU()(_norm(norm, name=f"{name}_bn2")(y))
    y = _conv(4 * filters, 1, 1, name=f"{name}_conv3")(y)
    y = _norm(norm, name=f"{name}_bn3")(y)
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv(4 * filters, 1, stride, name=f"{name}_down")(x)
        shortcut = _norm(norm, name=f"{name}_down_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def resnet(depth: int = 18, input_shape: Sequence[int] = (224, 224, 3),
           cifar_stem: bool = False, norm: str = "batch") -> keras.Model:
    """ResNet-18/34 (basic blocks) or ResNet-50 (bottlenecks), He et al. 2016.

    ``cifar_stem``: 3x3 stride-1 first conv and no max-pool (for 32x32 images);
    otherwise the 7x7 stride-2 conv + 3x3 stride-2 max-pool stem.
    Output: [B, 512] (18/34) or [B, 2048] (50).
    """
    plans = {18: ([2, 2, 2, 2], _basic_block), 34: ([3, 4, 6, 3], _basic_block),
             50: ([3, 4, 6, 3], _bottleneck)}
    if depth not in plans:
        raise ValueError(f"ResNet depth must be one of {sorted(plans)}, got {depth}.")
    blocks, block = plans[depth]
    x = inp = keras.Input(shape=tuple(input_shape))
    if cifar_stem:
        x = _conv(64, 3, 1, name="stem_conv")(x)
        x = layers.ReLU()(_norm(norm, name="stem_bn")(x))
    else:
        x = _conv(64, 7, 2, name="stem_conv")(x)
        x = layers.ReLU()(_norm(norm, name="stem_bn")(x))
        x = layers.MaxPool2D(3, strides=2, padding="same")(x)
    for stage, (n, filters) in enumerate(zip(blocks, [64, 128, 256, 512])):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            x = block(x, filters, stride, norm, name=f"stage{stage + 1}_block{b}")
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, x, name=f"resnet{depth}")


def wide_resnet(depth: int = 28, width: int = 2, input_shape: Sequence[int] = (32, 32, 3),
                norm: str = "batch", bn_momentum: float = 0.999,
                leaky_slope: float = 0.1, filters: Optional[int] = None,
                scales: int = 3) -> keras.Model:
    """WideResNet-depth-width (Zagoruyko & Komodakis 2016) as in MixMatch/FixMatch:
    pre-activation blocks, LeakyReLU(0.1), BN momentum 0.999 (PyTorch's 0.001).
    WRN-28-2 has about 1.47M parameters.

    Stage ``s`` (of ``scales``) has ``filters * 2^s`` channels and, for s > 0, a
    stride-2 first block: MixMatch-TF's ``filters << scale`` network, whose
    ``--filters`` and ``--scales`` the two arguments are (``filters`` defaults
    to ``16 * width``; its CIFAR-100 run uses 135, its STL-10 run 4 scales).
    ``(depth - 4) / 6`` blocks per stage. Output: [B, filters * 2^(scales - 1)].
    """
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}.")
    filters = 16 * width if filters is None else int(filters)
    if filters < 1 or scales < 1:
        raise ValueError(f"WideResNet needs filters >= 1 and scales >= 1, got {filters}, {scales}.")
    n = (depth - 4) // 6
    act = lambda: layers.LeakyReLU(negative_slope=leaky_slope)
    bn = lambda name: _norm(norm, momentum=bn_momentum, epsilon=1e-3, name=name)
    x = inp = keras.Input(shape=tuple(input_shape))
    x = _conv(16, 3, name="stem_conv")(x)
    for stage, stage_filters in enumerate([filters << k for k in range(scales)]):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            name = f"stage{stage + 1}_block{b}"
            pre = act()(bn(f"{name}_bn1")(x))
            # Only the network's first block takes its shortcut from the activated
            # input (official MixMatch/FixMatch: activate_before_residual on the
            # first scale); stages 2-3 project the raw input.
            shortcut_in = pre if (b == 0 and stage == 0) else x
            y = _conv(stage_filters, 3, stride, name=f"{name}_conv1")(pre)
            y = act()(bn(f"{name}_bn2")(y))
            y = _conv(stage_filters, 3, 1, name=f"{name}_conv2")(y)
            if stride != 1 or x.shape[-1] != stage_filters:
                shortcut = _conv(stage_filters, 1, stride, name=f"{name}_down")(shortcut_in)
            else:
                shortcut = x
            x = layers.Add()([y, shortcut])
    x = act()(bn("final_bn")(x))
    x = layers.GlobalAveragePooling2D()(x)
    tag = f"{width}" if filters == 16 * width else f"f{filters}"
    return keras.Model(inp, x, name=f"wrn{depth}_{tag}" + (f"_s{scales}" if scales != 3 else ""))


BACKBONES = ("small_cnn", "resnet18", "resnet50", "wrn28_2", "wrn28_8")
# WideResNets by MixMatch-TF's --filters / --scales: wrn28_f135 (135 filters),
# wrn28_2_s4 (4 scales), wrn28_f32_s4, ...
_WRN = re.compile(r"^wrn(\d+)_(?:(\d+)|f(\d+))(?:_s(\d+))?$")


def is_backbone(name: str) -> bool:
    """Whether ``get_backbone`` knows ``name``: one of BACKBONES or a WideResNet
    ``wrn<depth>_<width>`` / ``wrn<depth>_f<filters>``, optionally ``_s<scales>``."""
    return name in BACKBONES or bool(_WRN.match(name))


def get_backbone(name: str, input_shape: Sequence[int], norm: str = "batch",
                 cifar_stem: Optional[bool] = None) -> keras.Model:
    """A backbone by ``--backbone`` name. ``cifar_stem`` defaults to True for
    images of 64 px or less (ResNets only)."""
    if cifar_stem is None:
        cifar_stem = input_shape[0] <= 64
    if name == "small_cnn":
        return small_cnn(input_shape, norm=norm)
    if name in ("resnet18", "resnet50"):
        return resnet(int(name[6:]), input_shape, cifar_stem=cifar_stem, norm=norm)
    m = _WRN.match(name)
    if m:
        depth, width, filters, scales = m.groups()
        return wide_resnet(int(depth), int(width or 2), input_shape, norm=norm,
                           filters=int(filters) if filters else None,
                           scales=int(scales or 3))
    raise ValueError(f"--backbone={name!r} is not one of {BACKBONES} nor wrn<depth>_<width> / "
                     f"wrn<depth>_f<filters> with an optional _s<scales>.")
