"""Image views, applied per image inside ``tf.data`` (never inside the model).

Every view maps one uint8 image [H, W, C] to float32 [S, S, C] in [0, 1].
Because views run per element, random choices (RandAugment's ops, crop boxes,
colour jitter) are drawn per image, not per batch. Built from Keras 3
preprocessing layers where their semantics are the official ones, plus
``tf.image`` for the rest (random-resized crop, cutout, apply-with-probability,
and torchvision's colour jitter, grayscale and blur, whose Keras layers mean
something else).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import keras
import tensorflow as tf

View = Callable[[tf.Tensor], tf.Tensor]


def to_float(image: tf.Tensor, size: Optional[int] = None) -> tf.Tensor:
    """uint8 -> float32 in [0, 1], resized to ``size`` squares if given."""
    x = tf.cast(image, tf.float32) / 255.0
    if size is not None and (x.shape[0] != size or x.shape[1] != size):
        x = tf.image.resize(x, [size, size], antialias=True)
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x


def identity(size: int) -> View:
    """No augmentation: the evaluation view (resize only)."""
    return lambda image: to_float(image, size)


def resize_shorter(x: tf.Tensor, side: int) -> tf.Tensor:
    """Resizes float [H, W, C] so that its shorter side is ``side``, keeping the
    aspect ratio (the longer side becomes ``int(side * long / short)``, as
    torchvision's ``Resize(side)``)."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    short = tf.minimum(h, w)
    scale = tf.cast(side, tf.float64) / tf.cast(short, tf.float64)
    new_h = tf.where(h == short, side, tf.cast(tf.cast(h, tf.float64) * scale, tf.int32))
    new_w = tf.where(w == short, side, tf.cast(tf.cast(w, tf.float64) * scale, tf.int32))
    x = tf.image.resize(x, tf.stack([new_h, new_w]), antialias=True)
    return tf.clip_by_value(x, 0.0, 1.0)


def center_crop(size: int, crop_fraction: float = 0.875) -> View:
    """Evaluation view for large images (the official ImageNet one): resize the
    shorter side to ``int(size / crop_fraction)`` keeping the aspect ratio
    (256 for 224, 0.875), then take the central ``size`` x ``size`` crop."""
    big = int(size / crop_fraction)

    def view(image):
        x = resize_shorter(to_float(image), big)
        h, w = tf.shape(x)[0], tf.shape(x)[1]
        # torchvision's CenterCrop offsets: round((H - size) / 2).
        top = tf.cast(tf.round((h - size) / 2), tf.int32)
        left = tf.cast(tf.round((w - size) / 2), tf.int32)
        x = x[top:top + size, left:left + size]
        x.set_shape([size, size, image.shape[-1]])
        return x
    return view


def random_apply(fn: View, p: float) -> View:
    """Applies ``fn`` with probability ``p`` (a per-image coin)."""
    if p >= 1.0:
        return fn
    if p <= 0.0:
        return lambda x: x
    return lambda x: tf.cond(tf.random.uniform([]) < p, lambda: fn(x), lambda: x)


def random_resized_crop(image: tf.Tensor, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """Inception-style crop: a box of area fraction in ``scale`` and aspect ratio
    in ``ratio`` (whole image if none fits in 10 tries), resized to size x size.

    Args:
      image: float32 [H, W, C].
    Returns:
      float32 [size, size, C].
    """
    begin, box_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]),
        min_object_covered=0.0, aspect_ratio_range=list(ratio),
        area_range=list(scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, box_size)
    out = tf.image.resize(crop, [size, size], antialias=True)
    return tf.clip_by_value(out, 0.0, 1.0)


def cutout(image: tf.Tensor, max_fraction: float = 0.5, fill: float = 0.5) -> tf.Tensor:
    """Fills a square of side v * H (v ~ U(0, max_fraction)) at a random centre
    with ``fill`` (FixMatch's Cutout). image: float32 [H, W, C]."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.cast(tf.random.uniform([], 0.0, max_fraction) * tf.cast(h, tf.float32), tf.int32)
    cy = tf.random.uniform([], 0, h, dtype=tf.int32)
    cx = tf.random.uniform([], 0, w, dtype=tf.int32)
    y0, y1 = tf.maximum(cy - side // 2, 0), tf.minimum(cy - side // 2 + side, h)
    x0, x1 = tf.maximum(cx - side // 2, 0), tf.minimum(cx - side // 2 + side, w)
    ys = tf.range(h)[:, None]
    xs = tf.range(w)[None, :]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return tf.where(inside[..., None], tf.cast(fill, image.dtype), image)


def weak(size: int, channels: int = 3, flip: bool = True, pad: Optional[int] = None,
         resized_crop_scale: Optional[Sequence[float]] = None) -> View:
    """Weak view: horizontal flip + reflect-pad-and-crop (``pad`` pixels, default
    size/8), or a random-resized crop when ``resized_crop_scale`` is given."""
    flip_layer = keras.layers.RandomFlip("horizontal") if flip else None
    pad = max(1, size // 8) if pad is None else pad
    crop_layer = keras.layers.RandomCrop(size, size)

    def view(image):
        x = to_float(image)
        if resized_crop_scale is not None:
            x = random_resized_crop(x, size, resized_crop_scale)
        else:
            x = to_float(image, size)
            if pad > 0:
                x = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
                x = crop_layer(x, training=True)
        if flip_layer is not None:
            x = flip_layer(x, training=True)
        x.set_shape([size, size, channels])
        return x
    return view


def strong(size: int, channels: int = 3, flip: bool = True, pad: Optional[int] = None,
           num_ops: int = 3, magnitude: Optional[float] = None, cutout_fraction: float = 0.5,
           resized_crop_scale: Optional[Sequence[float]] = None) -> View:
    """Strong view: the weak view (pad-and-crop, or a random-resized crop when
    ``resized_crop_scale`` is given), then USB's RandAugment
    (``tfssl.randaugment``: ``num_ops`` ops drawn per image, 3 in USB's CIFAR /
    SVHN / STL-10 strong view, each with its value uniform over the op's range)
    and USB's Cutout (side ``v W``, v ~ U(0, ``cutout_fraction``); 0 for none).

    ``magnitude`` must be None: USB's RandAugment has no magnitude (its ``m`` is
    unused); the argument is kept for old callers of the Keras variant."""
    if magnitude is not None:
        raise ValueError("strong(): USB's RandAugment draws each op's value over its "
                         "whole range; magnitude is not a parameter (got "
                         f"{magnitude!r}).")
    from tfssl import randaugment  # imports this module
    base = weak(size, channels, flip=flip, pad=pad, resized_crop_scale=resized_crop_scale)
    ra = randaugment.rand_augment(num_ops, cutout_fraction)

    def view(image):
        x = ra(base(image))
        x.set_shape([size, size, channels])
        return x
    return view


# torchvision's luma weights (``rgb_to_grayscale``, ITU-R 601-2).
_LUMA = (0.2989, 0.587, 0.114)


def grayscale(x: tf.Tensor) -> tf.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of x [H, W, 3], as [H, W, 1]; a
    one-channel image is returned as it is."""
    if x.shape[-1] == 1:
        return x
    return tf.reduce_sum(x * tf.constant(_LUMA, x.dtype), axis=-1, keepdims=True)


def adjust_brightness(x: tf.Tensor, b) -> tf.Tensor:
    """``clip(b x)``: torchvision's brightness (a blend with black)."""
    return tf.clip_by_value(x * b, 0.0, 1.0)


def adjust_contrast(x: tf.Tensor, c) -> tf.Tensor:
    """``clip(c x + (1 - c) m)``, m the mean luma of the whole image (one scalar,
    not a per-channel mean): torchvision's contrast."""
    m = tf.reduce_mean(grayscale(x))
    return tf.clip_by_value(c * x + (1.0 - c) * m, 0.0, 1.0)


def adjust_saturation(x: tf.Tensor, s) -> tf.Tensor:
    """``clip(s x + (1 - s) gray(x))`` per pixel: torchvision's saturation
    (s = 0 gives the grayscale image, s = 1 the image)."""
    if x.shape[-1] == 1:
        return x
    return tf.clip_by_value(s * x + (1.0 - s) * grayscale(x), 0.0, 1.0)


def adjust_hue(x: tf.Tensor, h) -> tf.Tensor:
    """Rotates the HSV hue by ``h`` of a full turn (h in [-0.5, 0.5])."""
    if x.shape[-1] == 1:
        return x
    return tf.clip_by_value(tf.image.adjust_hue(x, h), 0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1) -> View:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)``.

    Per image: b, c, s ~ U(max(0, 1 - v), 1 + v) for v the argument, h ~ U(-hue,
    hue), and the four adjustments (``adjust_*``) in a random order. Keras's
    ``RandomColorJitter`` is not this: its saturation factor f in [0, 1] means
    f / (1 - f) (0.5 is the identity; f > 1 makes a gray image), and its
    brightness is additive.
    """
    ranges = [(max(0.0, 1.0 - v), 1.0 + v) for v in (brightness, contrast, saturation)]
    ranges.append((-hue, hue))

    def view(x):
        shape = x.shape
        factors = [tf.random.uniform([], lo, hi) for lo, hi in ranges]
        order = tf.random.shuffle(tf.range(4))
        for position in range(4):
            x = tf.switch_case(order[position], [
                (lambda op=op, f=f: op(x, f)) for op, f in zip(_JITTER_OPS, factors)])
            x.set_shape(shape)
        return x
    return view


def gaussian_blur(x: tf.Tensor, sigma, max_sigma: float = 2.0) -> tf.Tensor:
    """Separable Gaussian blur of x [H, W, C] with standard deviation ``sigma``
    pixels (PIL's ``GaussianBlur(radius=sigma)``, the MoCo v2 / PAWS blur).

    Taps ``k_t ∝ exp(-t² / 2σ²)`` for |t| <= 3 ``max_sigma``; the image's edge
    pixels extend outwards (as in PIL)."""
    radius = int(3 * max_sigma + 0.5)
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(t / sigma))
    k = k / tf.reduce_sum(k)
    c = x.shape[-1]

    def edge_pad(y, axis):
        n = tf.shape(y)[axis]
        return tf.gather(y, tf.clip_by_value(tf.range(-radius, n + radius), 0, n - 1), axis=axis)

    y = edge_pad(edge_pad(x, 0), 1)[None]
    kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
    kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
    y = tf.nn.depthwise_conv2d(y, kh, [1, 1, 1, 1], "VALID")
    y = tf.nn.depthwise_conv2d(y, kw, [1, 1, 1, 1], "VALID")
    return y[0]


def simclr_colour(channels: int = 3, strength: float = 1.0, jitter_p: float = 0.8,
                  grayscale_p: float = 0.2, blur_p: float = 0.5,
                  solarize_p: float = 0.0, equalize_p: float = 0.0,
                  hue: Optional[float] = None) -> View:
    """SimCLR colour distortion on a float [0, 1] image: ``color_jitter`` (0.8s,
    0.8s, 0.8s, 0.2s) with p=0.8, grayscale (luma) p=0.2, Gaussian blur (sigma
    ~ U(0.1, 2) px) with p=``blur_p``, then solarize (threshold uniform in [0, 1))
    and histogram equalisation, each with its probability. ``hue``, when given,
    replaces the jitter's 0.2s hue (SeLa's official jitter is (0.4, 0.4, 0.4, 0.4))."""
    s = strength
    jitter = color_jitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s if hue is None else hue)
    # PIL's solarize at a threshold drawn uniformly from [0, 256) (PAWS's Solarize).
    solar = keras.layers.Solarization(threshold_factor=(0.0, 1.0), value_range=(0, 1))
    equalize = keras.layers.Equalization(value_range=(0, 1))
    steps = [random_apply(jitter, jitter_p)]
    if channels == 3 and grayscale_p > 0:
        steps.append(random_apply(lambda x: tf.tile(grayscale(x), [1, 1, 3]), grayscale_p))
    if blur_p > 0:
        steps.append(random_apply(
            lambda x: gaussian_blur(x, tf.random.uniform([], 0.1, 2.0)), blur_p))
    if solarize_p > 0:
        steps.append(random_apply(lambda x: solar(x, training=True), solarize_p))
    if equalize_p > 0:
        steps.append(random_apply(lambda x: equalize(x, training=True), equalize_p))

    def view(x):
        shape = x.shape
        for step in steps:
            x = step(x)
            x.set_shape(shape)  # some layers lose the static channel count
        return tf.clip_by_value(x, 0.0, 1.0)
    return view


def simclr(size: int, channels: int = 3, scale: Sequence[float] = (0.2, 1.0),
           flip: bool = True, **colour_kwargs) -> View:
    """SimCLR view: random-resized crop + flip + colour distortion."""
    flip_layer = keras.layers.RandomFlip("horizontal") if flip else None
    colour = simclr_colour(channels, **colour_kwargs)

    def view(image):
        x = random_resized_crop(to_float(image), size, scale)
        x.set_shape([size, size, channels])
        if flip_layer is not None:
            x = flip_layer(x, training=True)
        x = colour(x)
        x.set_shape([size, size, channels])
        return x
    return view


def moco_v2(size: int, channels: int = 3, scale: Sequence[float] = (0.2, 1.0),
            flip: bool = True, blur_p: float = 0.5) -> View:
    """MoCo v2's augmentation (SimMatch's ImageNet strong view, ASCL's query):
    random-resized crop of area ``scale``, flip, colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur
    (sigma in [0.1, 2] pixels, whatever the image size, as the official codes)
    with p=``blur_p`` (0.5)."""
    return simclr(size, channels, scale, flip, strength=0.5, jitter_p=0.8, grayscale_p=0.2,
                  blur_p=blur_p)


def multicrop(global_size: int, local_size: int, num_global: int = 2, num_local: int = 6,
              channels: int = 3, global_scale: Sequence[float] = (0.14, 1.0),
              local_scale: Sequence[float] = (0.05, 0.14), flip: bool = True,
              **colour_kwargs) -> Dict[str, View]:
    """Multi-crop views: ``global_0..`` at ``global_size`` and ``local_0..`` at
    ``local_size``, each a SimCLR view with its own crop scale."""
    views = {f"global_{i}": simclr(global_size, channels, global_scale, flip, **colour_kwargs)
             for i in range(num_global)}
    views.update({f"local_{i}": simclr(local_size, channels, local_scale, flip, **colour_kwargs)
                  for i in range(num_local)})
    return views


# PAWS's view recipes (official code), per dataset scale: random-resized crop
# scales of the global and local views and the colour distortion.
PAWS_RECIPES = {
    "cifar": dict(global_scale=(0.75, 1.0), local_scale=(0.3, 0.75), strength=0.5,
                  solarize_p=0.2, equalize_p=0.2, blur_p=0.0, grayscale_p=0.0),
    "imagenet": dict(global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), strength=1.0,
                     solarize_p=0.0, equalize_p=0.0, blur_p=0.5, grayscale_p=0.2),
}


def paws(global_size: int, local_size: int, num_local: int = 6, channels: int = 3,
         recipe: str = "cifar", flip: bool = True, support_views: int = 2):
    """PAWS's views: ``(support views, unlabeled views)``.

    Supports: ``view_0 .. view_{support_views-1}``, each the global view of the
    labeled image. Unlabeled: ``global_0``, ``global_1`` at ``global_size`` and
    ``local_0 .. local_{num_local-1}`` at ``local_size`` (multi-crop), each a
    random-resized crop + flip + the recipe's colour distortion.

    Recipes (``PAWS_RECIPES``, suncet ``src/data_manager.py``): ``cifar`` crops
    (0.75, 1) / (0.3, 0.75), colour jitter strength 0.5 with p 0.8, solarize 0.2
    (threshold uniform in [0, 256)), equalize 0.2, no grayscale, no blur;
    ``imagenet`` crops (0.14, 1) / (0.05, 0.14) with SimCLR's colour (jitter 1.0,
    grayscale 0.2, blur 0.5).
    """
    if recipe not in PAWS_RECIPES:
        raise ValueError(f"PAWS view recipe {recipe!r} is not one of {sorted(PAWS_RECIPES)}.")
    if support_views < 1 or num_local < 0:
        raise ValueError("support_views must be >= 1 and num_local >= 0.")
    r = dict(PAWS_RECIPES[recipe])
    global_scale, local_scale = r.pop("global_scale"), r.pop("local_scale")
    unlabeled = multicrop(global_size, local_size, 2, num_local, channels, global_scale,
                          local_scale, flip, **r)
    supports = {f"view_{v}": simclr(global_size, channels, global_scale, flip, **r)
                for v in range(support_views)}
    return supports, unlabeled
