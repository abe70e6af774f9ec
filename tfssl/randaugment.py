"""USB's RandAugment (FixMatch's strong view in the USB code base), in TensorFlow.

Reference: microsoft/Semi-supervised-learning at 1ef4cbe,
``semilearn/datasets/augmentation/randaugment.py``: per image, ``n`` ops are drawn
uniformly with replacement from the 14 below, each with a value ``v ~ U(lo, hi)``
over its whole range (USB's magnitude ``m`` is unused), then Cutout of a square
of side ``v W``, ``v ~ U(0, 0.5)``. The CIFAR / SVHN / STL-10 strong view is
``RandAugment(3, 5)`` after flip and pad-and-crop.

Every op maps float32 [H, W, C] in [0, 1] (C = 1 or 3) to the same, with PIL's
semantics for 8-bit images (pixel level ``k = round(255 x)`` where an op needs
levels). Geometric ops and the histogram ops are exact for 8-bit inputs. The
blends (Brightness, Color, Contrast, Sharpness) are not re-quantised to 8 bits
(PIL truncates each result to an integer level: <= 1 level apart).

| op | v range | equation (x in [0, 1], k = 255 x) |
|---|---|---|
| AutoContrast | - | per channel ``(k - lo) 255 / (hi - lo)`` truncated |
| Brightness | [0.05, 0.95] | ``v x`` |
| Color | [0.05, 0.95] | ``g + v (x - g)``, g the luma |
| Contrast | [0.05, 0.95] | ``m + v (x - m)``, m the rounded mean luma |
| Equalize | - | PIL's per-channel histogram equalisation |
| Identity | - | ``x`` |
| Posterize | [4, 8] | ``b = int(v)`` bits kept: ``k & ~(2^(8-b) - 1)`` |
| Rotate | [-30, 30] | degrees counter-clockwise about the centre |
| Sharpness | [0.05, 0.95] | ``s + v (x - s)``, s = SMOOTH-filtered x |
| ShearX / ShearY | [-0.3, 0.3] | input ``(x + v y, y)`` / ``(x, v x + y)`` |
| Solarize | [0, 256] | ``k if k < v else 255 - k`` |
| TranslateX / Y | [-0.3, 0.3] | input ``(x + v W, y)`` / ``(x, y + v H)`` |

Geometric ops sample the input at ``floor(A (x + 1/2, y + 1/2))`` for output
pixel (x, y) (PIL's nearest-neighbour affine) and fill with black.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import tensorflow as tf

from tfssl import augment

View = Callable[[tf.Tensor], tf.Tensor]

# USB's ``augment_list()`` (randaugment.py:145-162): name, lo, hi.
OPS = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)

# USB's CutoutAbs fill (randaugment.py:138), RGB levels.
CUTOUT_FILL = (125, 123, 114)


def _levels(x: tf.Tensor) -> tf.Tensor:
    """float [0, 1] -> int32 levels ``round(255 x)``."""
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.int32)


def _from_levels(k: tf.Tensor) -> tf.Tensor:
    return tf.cast(k, tf.float32) / 255.0


def blend(degenerate: tf.Tensor, x: tf.Tensor, v) -> tf.Tensor:
    """PIL's ``ImageEnhance`` blend ``clip(d + v (x - d))``."""
    return tf.clip_by_value(degenerate + v * (x - degenerate), 0.0, 1.0)


def identity(x: tf.Tensor, v=None) -> tf.Tensor:
    """``x``."""
    return x


def auto_contrast(x: tf.Tensor, v=None) -> tf.Tensor:
    """PIL's ``ImageOps.autocontrast``: per channel, with lo / hi the smallest /
    largest level, ``int(k 255 / (hi - lo) - lo 255 / (hi - lo))`` clipped to
    [0, 255]; a constant channel (hi <= lo) is unchanged."""
    k = tf.cast(_levels(x), tf.float64)
    lo = tf.reduce_min(k, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(k, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    out = tf.clip_by_value(tf.floor(k * scale - lo * scale), 0.0, 255.0)
    out = tf.where(hi > lo, out, k)
    return tf.cast(out, tf.float32) / 255.0


def brightness(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's Brightness: a blend with black, ``clip(v x)``."""
    return augment.adjust_brightness(x, v)


def color(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's Color: a blend with the luma image, ``clip(g + v (x - g))``; a
    one-channel image is unchanged."""
    return augment.adjust_saturation(x, v)


def contrast(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's Contrast: a blend with the constant ``m = int(mean(255 luma) + 0.5)
    / 255`` (the rounded mean of the L image), ``clip(m + v (x - m))``."""
    m = tf.floor(tf.reduce_mean(_from_levels(_levels(augment.grayscale(x)))) * 255.0 + 0.5)
    return blend(m / 255.0, x, v)


def equalize(x: tf.Tensor, v=None) -> tf.Tensor:
    """PIL's ``ImageOps.equalize``, per channel: with h the 256-bin histogram,
    N pixels and h_last the count of the largest level present,
    ``step = (N - h_last) // 255``; if step = 0 the channel is unchanged, else
    ``lut[i] = (step // 2 + sum_{j<i} h[j]) // step`` clipped to 255."""
    k = _levels(x)
    c = x.shape[-1]
    flat = tf.reshape(k, [-1, c])
    n = tf.shape(flat)[0]
    hist = tf.math.bincount(tf.transpose(flat), minlength=256, maxlength=256, axis=-1)
    last = tf.reduce_max(tf.where(hist > 0, tf.range(256)[None], -1), axis=1)
    h_last = tf.gather(hist, last, batch_dims=1)
    step = (n - h_last) // 255  # [C]
    before = tf.cumsum(hist, axis=1, exclusive=True)
    lut = tf.minimum((step[:, None] // 2 + before) // tf.maximum(step[:, None], 1), 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])  # [C, 256]
    out = tf.gather(lut, tf.transpose(flat), batch_dims=1)  # [C, HW]
    return tf.reshape(_from_levels(tf.transpose(out)), tf.shape(x))


def posterize(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's ``ImageOps.posterize`` with ``b = max(1, int(v))`` bits:
    ``k & ~(2^(8-b) - 1)``."""
    bits = tf.maximum(1, tf.cast(tf.floor(v), tf.int32))
    mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1)
    return _from_levels(tf.bitwise.bitwise_and(_levels(x), mask))


def solarize(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's ``ImageOps.solarize(threshold=v)``: levels ``k >= v`` become
    ``255 - k``."""
    k = _levels(x)
    return _from_levels(tf.where(tf.cast(k, tf.float32) < v, k, 255 - k))


def sharpness(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's Sharpness: a blend with ``s``, the image filtered by PIL's SMOOTH
    kernel ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` (rounded to levels) on
    interior pixels and equal to x on the one-pixel border, ``clip(s + v (x - s))``."""
    c = x.shape[-1]
    kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = _from_levels(_levels(smooth))
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
    interior = (ys > 0) & (ys < h - 1) & (xs > 0) & (xs < w - 1)
    return blend(tf.where(interior[..., None], smooth, x), x, v)


def affine(x: tf.Tensor, matrix: Sequence) -> tf.Tensor:
    """PIL's ``Image.transform(size, AFFINE, (a, b, c, d, e, f))`` with
    nearest-neighbour sampling and black fill: output pixel (x, y) takes the
    input at ``(floor(a (x + ½) + b (y + ½) + c), floor(d (x + ½) + e (y + ½) + f))``,
    or 0 when that is outside the image. Coordinates in float64."""
    a, b, c, d, e, f = [tf.cast(m, tf.float64) for m in matrix]
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    ys = tf.cast(tf.range(h), tf.float64)[:, None] + 0.5
    xs = tf.cast(tf.range(w), tf.float64)[None, :] + 0.5
    xin = tf.cast(tf.floor(a * xs + b * ys + c), tf.int32)
    yin = tf.cast(tf.floor(d * xs + e * ys + f), tf.int32)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    idx = tf.stack([tf.clip_by_value(yin, 0, h - 1), tf.clip_by_value(xin, 0, w - 1)], -1)
    return tf.where(inside[..., None], tf.gather_nd(x, idx), tf.zeros([], x.dtype))


def rotate(x: tf.Tensor, v) -> tf.Tensor:
    """PIL's ``Image.rotate(v)``: v degrees counter-clockwise about
    ``(W / 2, H / 2)``; with t = -v in radians the inverse map is
    ``(cos t, sin t, c; -sin t, cos t, f)``, c and f keeping the centre fixed."""
    t = -tf.cast(v, tf.float64) * (math.pi / 180.0)
    cos, sin = tf.cos(t), tf.sin(t)
    cx = tf.cast(tf.shape(x)[1], tf.float64) / 2.0
    cy = tf.cast(tf.shape(x)[0], tf.float64) / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine(x, (cos, sin, c, -sin, cos, f))


def shear_x(x: tf.Tensor, v) -> tf.Tensor:
    """USB's ShearX: affine ``(1, v, 0, 0, 1, 0)``."""
    return affine(x, (1.0, v, 0.0, 0.0, 1.0, 0.0))


def shear_y(x: tf.Tensor, v) -> tf.Tensor:
    """USB's ShearY: affine ``(1, 0, 0, v, 1, 0)``."""
    return affine(x, (1.0, 0.0, 0.0, v, 1.0, 0.0))


def translate_x(x: tf.Tensor, v) -> tf.Tensor:
    """USB's TranslateX: affine ``(1, 0, v W, 0, 1, 0)``."""
    w = tf.cast(tf.shape(x)[1], tf.float32)
    return affine(x, (1.0, 0.0, v * w, 0.0, 1.0, 0.0))


def translate_y(x: tf.Tensor, v) -> tf.Tensor:
    """USB's TranslateY: affine ``(1, 0, 0, 0, 1, v H)``."""
    h = tf.cast(tf.shape(x)[0], tf.float32)
    return affine(x, (1.0, 0.0, 0.0, 0.0, 1.0, v * h))


FUNCTIONS = {
    "AutoContrast": auto_contrast, "Brightness": brightness, "Color": color,
    "Contrast": contrast, "Equalize": equalize, "Identity": identity,
    "Posterize": posterize, "Rotate": rotate, "Sharpness": sharpness,
    "ShearX": shear_x, "ShearY": shear_y, "Solarize": solarize,
    "TranslateX": translate_x, "TranslateY": translate_y,
}


def cutout(x: tf.Tensor, v, x0, y0) -> tf.Tensor:
    """USB's ``Cutout(v)``: side ``s = v W`` pixels; with ``x0, y0`` drawn by the
    caller (USB: ``np.random.uniform(W)``, i.e. U(1, W]), the box starts at
    ``(int(max(0, x0 - s/2)), int(max(0, y0 - s/2)))``, ends at ``min(W, start + s)``
    (``min(H, ...)`` for y) and PIL's rectangle fills the columns / rows from the
    start to the floor of the end, both included, with (125, 123, 114) / 255
    (123 / 255, the fill's PIL luma, on one channel). v <= 0 leaves x unchanged."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    s = v * wf
    xa = tf.floor(tf.maximum(0.0, x0 - s / 2.0))
    ya = tf.floor(tf.maximum(0.0, y0 - s / 2.0))
    xb = tf.floor(tf.minimum(wf, xa + s))
    yb = tf.floor(tf.minimum(hf, ya + s))
    ys = tf.cast(tf.range(h), tf.float32)[:, None]
    xs = tf.cast(tf.range(w), tf.float32)[None, :]
    inside = (ys >= ya) & (ys <= yb) & (xs >= xa) & (xs <= xb) & (v > 0)
    fill = CUTOUT_FILL if x.shape[-1] == 3 else (123,)
    fill = tf.constant(fill, x.dtype) / 255.0
    return tf.where(inside[..., None], fill, x)


def random_cutout(x: tf.Tensor, max_fraction: float = 0.5) -> tf.Tensor:
    """USB's Cutout draw: ``v ~ U(0, max_fraction)``, ``x0 ~ U(1, W]``,
    ``y0 ~ U(1, H]`` (``np.random.uniform(W)`` is U(low=W, high=1))."""
    wf = tf.cast(tf.shape(x)[1], tf.float32)
    hf = tf.cast(tf.shape(x)[0], tf.float32)
    v = tf.random.uniform([]) * max_fraction
    x0 = wf + (1.0 - wf) * tf.random.uniform([])
    y0 = hf + (1.0 - hf) * tf.random.uniform([])
    return cutout(x, v, x0, y0)


def apply_op(x: tf.Tensor, index, v) -> tf.Tensor:
    """Applies op ``OPS[index]`` (an int32 scalar tensor) with value ``v``."""
    shape = x.shape
    branches = [(lambda fn=FUNCTIONS[name]: fn(x, v)) for name, _, _ in OPS]
    out = tf.switch_case(index, branches)
    out.set_shape(shape)
    return out


def sample_ops(num_ops: int):
    """``num_ops`` op indices uniform over OPS with replacement (USB's
    ``random.choices``) and their values ``lo + (hi - lo) U``, U ~ U[0, 1)."""
    index = tf.random.uniform([num_ops], 0, len(OPS), dtype=tf.int32)
    lo = tf.gather(tf.constant([o[1] for o in OPS]), index)
    hi = tf.gather(tf.constant([o[2] for o in OPS]), index)
    return index, lo + (hi - lo) * tf.random.uniform([num_ops])


def rand_augment(num_ops: int = 3, cutout_fraction: float = 0.5) -> View:
    """USB's ``RandAugment(n=num_ops, m)`` on float [H, W, C] in [0, 1]: per
    image, ``num_ops`` ops of ``OPS`` with their values (``sample_ops``), then
    Cutout with ``v ~ U(0, cutout_fraction)`` (0 for none)."""
    def view(x):
        index, values = sample_ops(num_ops)
        for i in range(num_ops):
            x = apply_op(x, index[i], values[i])
        if cutout_fraction > 0:
            x = random_cutout(x, cutout_fraction)
        return x
    return view
