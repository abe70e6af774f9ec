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


PADDINGS = ("tf", "torch")


def _conv(filters, kernel, stride=1, name=None, padding="tf", use_bias=False,
          kernel_initializer="he_normal", bias_initializer="zeros"):
    """A bias-free ``kernel`` x ``kernel`` convolution, as a function of its input.

    ``padding="tf"``: TF's ``same`` (a strided conv on an even side pads 0
    before and 1 after: the TF official WRNs). ``padding="torch"``: PyTorch's
    ``padding=kernel // 2`` on every side (torchvision's ResNets, USB's WRN),
    i.e. ``ZeroPadding2D(kernel // 2)`` then a ``valid`` convolution. The two
    differ only for strided convolutions with ``kernel > 1``; the same weights
    give the same output shape but a grid shifted by one pixel.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {PADDINGS}.")
    conv_kw = dict(strides=stride, use_bias=use_bias, kernel_initializer=kernel_initializer,
                   bias_initializer=bias_initializer, name=name)
    if padding == "tf" or stride == 1 or kernel == 1:
        return layers.Conv2D(filters, kernel, padding="same", **conv_kw)
    pad = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad" if name else None)
    conv = layers.Conv2D(filters, kernel, padding="valid", **conv_kw)
    return lambda x: conv(pad(x))


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


def _basic_block(x, filters, stride, norm, name, padding):
    shortcut = x
    y = _conv(filters, 3, stride, name=f"{name}_conv1", padding=padding)(x)
    y = layers.ReLU()(_norm(norm, name=f"{name}_bn1")(y))
    y = _conv(filters, 3, 1, name=f"{name}_conv2")(y)
    y = _norm(norm, name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, name=f"{name}_down")(x)
        shortcut = _norm(norm, name=f"{name}_down_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def _bottleneck(x, filters, stride, norm, name, padding):
    shortcut = x
    y = _conv(filters, 1, 1, name=f"{name}_conv1")(x)
    y = layers.ReLU()(_norm(norm, name=f"{name}_bn1")(y))
    y = _conv(filters, 3, stride, name=f"{name}_conv2", padding=padding)(y)
    y = layers.ReLU()(_norm(norm, name=f"{name}_bn2")(y))
    y = _conv(4 * filters, 1, 1, name=f"{name}_conv3")(y)
    y = _norm(norm, name=f"{name}_bn3")(y)
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv(4 * filters, 1, stride, name=f"{name}_down")(x)
        shortcut = _norm(norm, name=f"{name}_down_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def resnet(depth: int = 18, input_shape: Sequence[int] = (224, 224, 3),
           cifar_stem: bool = False, norm: str = "batch", padding: str = "torch") -> keras.Model:
    """ResNet-18/34 (basic blocks) or ResNet-50 (bottlenecks, stride on the 3x3
    conv as torchvision's), He et al. 2016.

    ``cifar_stem``: 3x3 stride-1 first conv and no max-pool (for 32x32 images);
    otherwise the 7x7 stride-2 conv + 3x3 stride-2 max-pool stem.
    ``padding``: ``"torch"`` (default; every official ResNet recipe is
    torchvision's: a strided k x k conv pads k // 2 on every side, the stem's
    max-pool pads 1) or ``"tf"`` (TF ``same``); see ``_conv``.
    Output: [B, 512] (18/34) or [B, 2048] (50).
    """
    plans = {18: ([2, 2, 2, 2], _basic_block), 34: ([3, 4, 6, 3], _basic_block),
             50: ([3, 4, 6, 3], _bottleneck)}
    if depth not in plans:
        raise ValueError(f"ResNet depth must be one of {sorted(plans)}, got {depth}.")
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {PADDINGS}.")
    blocks, block = plans[depth]
    x = inp = keras.Input(shape=tuple(input_shape))
    if cifar_stem:
        x = _conv(64, 3, 1, name="stem_conv")(x)
        x = layers.ReLU()(_norm(norm, name="stem_bn")(x))
    else:
        x = _conv(64, 7, 2, name="stem_conv", padding=padding)(x)
        x = layers.ReLU()(_norm(norm, name="stem_bn")(x))
        if padding == "torch":
            # torchvision's MaxPool2d(3, 2, padding=1) pads with -inf; after the
            # ReLU every value is >= 0, so zero padding gives the same maxima.
            x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
            x = layers.MaxPool2D(3, strides=2, padding="valid")(x)
        else:
            x = layers.MaxPool2D(3, strides=2, padding="same")(x)
    for stage, (n, filters) in enumerate(zip(blocks, [64, 128, 256, 512])):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            x = block(x, filters, stride, norm, name=f"stage{stage + 1}_block{b}",
                      padding=padding)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, x, name=f"resnet{depth}")


WRN_FORMS = ("tf", "usb", "suncet")


def _torch_default_init(fan_in: int):
    """PyTorch's default ``nn.Conv2d`` initialisation: kernel
    ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    and the bias from the same range. Returns (kernel, bias) initialisers."""
    bound = fan_in ** -0.5
    return (keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
            keras.initializers.RandomUniform(-bound, bound))


def wide_resnet(depth: int = 28, width: int = 2, input_shape: Sequence[int] = (32, 32, 3),
                norm: str = "batch", bn_momentum: Optional[float] = None,
                leaky_slope: float = 0.1, filters: Optional[int] = None,
                scales: int = 3, padding: Optional[str] = None,
                form: str = "tf") -> keras.Model:
    """WideResNet-depth-width (Zagoruyko & Komodakis 2016) in the form of one
    official code. ``(depth - 4) / 6`` blocks per stage; stage ``s`` (of
    ``scales``) has ``filters * 2^s`` channels and, for s > 0, a stride-2
    first block. Output: [B, filters * 2^(scales - 1)].

    ``form``:

    - ``"tf"`` (MixMatch / FixMatch, google-research): pre-activation blocks
      ``conv2(act(bn2(conv1(act(bn1(x)))))) + shortcut``, LeakyReLU(0.1), BN
      momentum 0.999 (PyTorch's 0.001) and epsilon 1e-3, He-normal kernels, no
      conv biases; the network's first block takes its shortcut from the
      activated input, stages 2+ project the raw input. ``filters`` and
      ``scales`` are MixMatch-TF's ``--filters`` / ``--scales`` (its CIFAR-100
      run uses 135 filters, its STL-10 run 4 scales). WRN-28-2: 1,467,424
      parameters.
    - ``"usb"`` (microsoft/Semi-supervised-learning ``nets/wrn/wrn.py``, the
      network of USB's SimMatch / FixMatch): as ``"tf"`` but the first block of
      stages 2+ feeds the RAW input to conv1 (USB computes bn1 / relu1 there
      and drops the result, so that BN is left out here), BN epsilon 1e-5 in the
      blocks (1e-3 final), a biased stem, and USB's initialisation (Kaiming
      normal, fan-out, leaky-ReLU gain; the stem bias as PyTorch's default).
    - ``"suncet"`` (facebookresearch/suncet ``src/wide_resnet.py``, PAWS's
      CIFAR network): ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)``
      with the stride on conv2, the shortcut always on the raw input, ReLU,
      biases on every conv, no BN after the stem, PyTorch's default BN
      (momentum 0.1, i.e. Keras 0.9; epsilon 1e-5) and a final BN of PyTorch
      momentum 0.99 (Keras 0.01), PyTorch's default initialisation. Dropout is
      0, as in PAWS's training.

    ``padding`` of the strided 3x3 convs (``_conv``): ``"tf"`` for the TF form,
    ``"torch"`` for the PyTorch forms by default. ``bn_momentum`` (Keras
    convention) overrides the block BN momentum of the form.
    """
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}.")
    if form not in WRN_FORMS:
        raise ValueError(f"WideResNet form={form!r} is not one of {WRN_FORMS}.")
    filters = 16 * width if filters is None else int(filters)
    if filters < 1 or scales < 1:
        raise ValueError(f"WideResNet needs filters >= 1 and scales >= 1, got {filters}, {scales}.")
    padding = padding or ("tf" if form == "tf" else "torch")
    n = (depth - 4) // 6
    stage_filters = [filters << k for k in range(scales)]
    x = inp = keras.Input(shape=tuple(input_shape))
    build = {"tf": _wrn_tf_usb, "usb": _wrn_tf_usb, "suncet": _wrn_suncet}[form]
    x = build(x, n, stage_filters, norm, bn_momentum, leaky_slope, padding, form)
    x = layers.GlobalAveragePooling2D()(x)
    tag = f"{width}" if filters == 16 * width else f"f{filters}"
    name = f"wrn{depth}_{tag}" + (f"_s{scales}" if scales != 3 else "")
    return keras.Model(inp, x, name=name + ("" if form == "tf" else f"_{form}"))


def _wrn_tf_usb(x, n, stage_filters, norm, bn_momentum, leaky_slope, padding, form):
    """The google-research (``form="tf"``) and USB (``"usb"``) WRN bodies."""
    usb = form == "usb"
    momentum = 0.999 if bn_momentum is None else bn_momentum
    act = lambda: layers.LeakyReLU(negative_slope=leaky_slope)
    bn = lambda name, eps=(1e-5 if usb else 1e-3): _norm(norm, momentum=momentum, epsilon=eps,
                                                         name=name)
    if usb:  # kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu"): a = 0.01
        init = dict(kernel_initializer=keras.initializers.VarianceScaling(
            2.0 / (1 + 0.01 ** 2), "fan_out", "untruncated_normal"))
        _, stem_bias = _torch_default_init(9 * x.shape[-1])  # USB re-inits the kernel only
        x = _conv(16, 3, name="stem_conv", use_bias=True, bias_initializer=stem_bias,
                  **init)(x)
    else:
        init = {}
        x = _conv(16, 3, name="stem_conv")(x)
    for stage, f in enumerate(stage_filters):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            name = f"stage{stage + 1}_block{b}"
            project = stride != 1 or x.shape[-1] != f
            if usb and project and stage > 0:
                # USB: conv1 and the shortcut take the raw input (bn1 unused).
                pre = shortcut_in = x
            else:
                pre = act()(bn(f"{name}_bn1")(x))
                # the network's first block takes its shortcut from the activated
                # input (activate_before_residual); stages 2+ project the raw input
                shortcut_in = pre if (b == 0 and stage == 0) else x
            y = _conv(f, 3, stride, name=f"{name}_conv1", padding=padding, **init)(pre)
            y = act()(bn(f"{name}_bn2")(y))
            y = _conv(f, 3, 1, name=f"{name}_conv2", **init)(y)
            shortcut = (_conv(f, 1, stride, name=f"{name}_down", **init)(shortcut_in)
                        if project else x)
            x = layers.Add()([y, shortcut])
    return act()(bn("final_bn", 1e-3)(x))


def _wrn_suncet(x, n, stage_filters, norm, bn_momentum, leaky_slope, padding, form):
    """suncet's WRN body (PAWS CIFAR); see ``wide_resnet``."""
    momentum = 0.9 if bn_momentum is None else bn_momentum

    def conv(f, k, stride, name, inp):
        kernel, bias = _torch_default_init(k * k * inp.shape[-1])
        return _conv(f, k, stride, name=name, padding=padding, use_bias=True,
                     kernel_initializer=kernel, bias_initializer=bias)(inp)

    x = conv(16, 3, 1, "stem_conv", x)
    for stage, f in enumerate(stage_filters):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            name = f"stage{stage + 1}_block{b}"
            y = layers.ReLU()(_norm(norm, momentum, 1e-5, name=f"{name}_bn1")(x))
            y = conv(f, 3, 1, f"{name}_conv1", y)
            y = layers.ReLU()(_norm(norm, momentum, 1e-5, name=f"{name}_bn2")(y))
            y = conv(f, 3, stride, f"{name}_conv2", y)
            shortcut = (conv(f, 1, stride, f"{name}_down", x)
                        if stride != 1 or x.shape[-1] != f else x)
            x = layers.Add()([y, shortcut])
    # nn.BatchNorm2d(momentum=0.99): PyTorch's momentum is Keras's 1 - momentum
    return layers.ReLU()(_norm(norm, 0.01, 1e-5, name="final_bn")(x))


BACKBONES = ("small_cnn", "resnet18", "resnet50", "wrn28_2", "wrn28_8", "wrn28_2_usb",
             "wrn28_2_suncet")
# WideResNets by MixMatch-TF's --filters / --scales: wrn28_f135 (135 filters),
# wrn28_2_s4 (4 scales), wrn28_f32_s4, ...; a _usb / _suncet suffix picks that
# official code's form of the network (wide_resnet's ``form``).
_WRN = re.compile(r"^wrn(\d+)_(?:(\d+)|f(\d+))(?:_s(\d+))?(?:_(usb|suncet))?$")


def is_backbone(name: str) -> bool:
    """Whether ``get_backbone`` knows ``name``: one of BACKBONES or a WideResNet
    ``wrn<depth>_<width>`` / ``wrn<depth>_f<filters>``, optionally ``_s<scales>``,
    optionally ``_usb`` / ``_suncet``."""
    return name in BACKBONES or bool(_WRN.match(name))


def default_padding(name: str) -> str:
    """The padding of the official code behind backbone ``name``: ``"torch"``
    for the ResNets (torchvision's, in every official ResNet recipe) and the
    PyTorch WideResNet forms (``_usb``, ``_suncet``), ``"tf"`` for the
    google-research WideResNets and small_cnn (no strided convolution)."""
    m = _WRN.match(name)
    if m:
        return "torch" if m.group(5) else "tf"
    return "torch" if name.startswith("resnet") else "tf"


def get_backbone(name: str, input_shape: Sequence[int], norm: str = "batch",
                 cifar_stem: Optional[bool] = None, padding: Optional[str] = None) -> keras.Model:
    """A backbone by ``--backbone`` name. ``cifar_stem`` defaults to True for
    images of 64 px or less (ResNets only); ``padding`` (``"tf"`` or
    ``"torch"``, see ``_conv``) to ``default_padding(name)``."""
    if cifar_stem is None:
        cifar_stem = input_shape[0] <= 64
    padding = default_padding(name) if padding in (None, "auto") else padding
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {PADDINGS}.")
    if name == "small_cnn":
        return small_cnn(input_shape, norm=norm)
    if name in ("resnet18", "resnet50"):
        return resnet(int(name[6:]), input_shape, cifar_stem=cifar_stem, norm=norm,
                      padding=padding)
    m = _WRN.match(name)
    if m:
        depth, width, filters, scales, form = m.groups()
        return wide_resnet(int(depth), int(width or 2), input_shape, norm=norm,
                           filters=int(filters) if filters else None,
                           scales=int(scales or 3), padding=padding, form=form or "tf")
    raise ValueError(f"--backbone={name!r} is not one of {BACKBONES} nor wrn<depth>_<width> / "
                     f"wrn<depth>_f<filters> with an optional _s<scales> and _usb / _suncet.")
