"""USB's RandAugment (tfssl.randaugment) against PIL, the library USB's ops call."""

import numpy as np
import pytest
import tensorflow as tf

from tfssl import augment, randaugment as ra

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw, ImageEnhance, ImageOps  # noqa: E402


def _image(seed, h=9, w=11, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _pil(k):
    return Image.fromarray(k[..., 0] if k.shape[-1] == 1 else k)


def _np(im, c):
    a = np.asarray(im)
    return a[..., None] if c == 1 else a


def _ours(fn, k, *v):
    return np.asarray(fn(tf.constant(k, tf.float32) / 255.0, *v)) * 255.0


# PIL references, written as USB's randaugment.py calls them.
REFERENCE = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE,
                                             (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE,
                                             (1, 0, 0, 0, 1, v * im.size[1])),
}
# Blends are not re-truncated to 8 bits as PIL's are: at most ~1.5 levels apart.
BLENDS = {"Brightness", "Color", "Contrast", "Sharpness"}


@pytest.mark.parametrize("c", [1, 3])
def test_each_op_matches_pil(c):
    """Every op, at values spread over USB's range, against PIL on 9x11 images
    (exact for all but the blends). Mutants caught: rotate clockwise (sign of
    t), rotation about (W-1)/2, affine sampled at x instead of x + 1/2, shear
    sign, translate by v H on x, autocontrast over all channels at once, posterize
    by round(v), sharpness smoothing the border, brightness 1 + v."""
    for j, (name, lo, hi) in enumerate(ra.OPS):
        fn = ra.FUNCTIONS[name]
        for i, u in enumerate((0.0, 0.13, 0.5, 0.77, 0.999)):
            v = float(np.float32(lo + (hi - lo) * u))
            k = _image(100 * j + i, c=c)
            if i == 4:
                k = (k // 37) * 37  # few levels: histogram ties, small ranges
            want = _np(REFERENCE[name](_pil(k), v), c).astype(np.float64)
            got = _ours(fn, k, v)
            tol = 1.5 if name in BLENDS else 1e-3
            err = np.abs(got - want).max()
            assert err <= tol, (name, v, c, err)


@pytest.mark.parametrize("c", [1, 3])
def test_histogram_ops_and_contrast_mean_exact(c):
    """Equalize on 32x32 images (step = (N - h_last) // 255 > 0; on the 9x11
    images above it is always the identity), Solarize at integer thresholds
    (ties k = v), Contrast at v = 0 (the degenerate image alone, no blend
    tolerance): all exact against PIL. Mutants caught: equalize without the
    step // 2 offset, with h_last kept, with // 256 for PIL's // 255, or
    without the clip at 255; solarize inverting k > v instead of k >= v, contrast
    with the unrounded mean luma."""
    for seed in range(3):
        k = (_image(50 + seed, 32, 32, c) // (5 + 20 * seed)) * (5 + 20 * seed)
        want = _np(ImageOps.equalize(_pil(k)), c)
        assert np.abs(_ours(ra.equalize, k) - want).max() < 1e-3, seed
        for t in (0, 100, int(k[0, 0, 0]), 255):
            want = _np(ImageOps.solarize(_pil(k), t), c)
            assert np.abs(_ours(ra.solarize, k, float(t)) - want).max() < 1e-3, t
        want = _np(ImageEnhance.Contrast(_pil(k)).enhance(0.0), c)
        assert np.abs(_ours(ra.contrast, k, 0.0) - want).max() < 1e-3, seed


def test_constant_and_two_level_images():
    """Degenerate histograms: AutoContrast and Equalize leave a constant image
    alone, and Equalize on two levels matches PIL. Mutant caught: dividing by
    (hi - lo) without the hi <= lo guard (NaN), equalize without the step == 0
    identity."""
    k = np.full((8, 8, 3), 77, np.uint8)
    for name in ("AutoContrast", "Equalize"):
        assert np.allclose(_ours(ra.FUNCTIONS[name], k), 77, atol=1e-3), name
    k = np.zeros((8, 8, 1), np.uint8)
    k[:3] = 200
    want = _np(ImageOps.equalize(_pil(k)), 1)
    assert np.allclose(_ours(ra.equalize, k), want, atol=1e-3)


def _usb_cutout(k, v, x0, y0):
    """USB's CutoutAbs with x0, y0 given (randaugment.py:124-142)."""
    im = _pil(k).copy()
    w, h = im.size
    s = v * w
    x0, y0 = int(max(0, x0 - s / 2.0)), int(max(0, y0 - s / 2.0))
    ImageDraw.Draw(im).rectangle((x0, y0, min(w, x0 + s), min(h, y0 + s)), (125, 123, 114))
    return np.asarray(im)


def test_cutout_matches_usb():
    """Cutout boxes against USB's CutoutAbs + PIL's rectangle (ends included,
    fill (125, 123, 114)). Mutants caught: end excluded (xs < xb), side from a
    fraction of H on a non-square image, fill 0.5 gray, start rounded not
    truncated."""
    k = _image(7, h=10, w=12)
    for v, x0, y0 in [(0.3, 5.2, 3.7), (0.45, 11.9, 9.5), (0.1, 1.0, 1.0), (0.26, 6.5, 8.1)]:
        want = _usb_cutout(k, v, x0, y0)
        got = _ours(lambda x: ra.cutout(x, v, x0, y0), k)
        assert np.abs(got - want).max() < 1e-3, (v, x0, y0)


def _chain(num_ops, cutout_fraction=0.0, n=64, size=8, c=3, seed=0):
    k = _image(seed, size, size, c)
    ds = tf.data.Dataset.from_tensors(tf.constant(k, tf.float32) / 255.0).repeat(n)
    ds = ds.map(ra.rand_augment(num_ops, cutout_fraction))
    return k, np.stack(list(ds.as_numpy_iterator()))


def test_per_image_draws_and_op_count_in_tf_data():
    """In tf.data every element draws its own ops: most of 200 copies of one
    8x8 image differ, and with 3 ops few come out unchanged (one op leaves
    about 2/14 of them unchanged: Identity, and AutoContrast on an image
    spanning 0..255). num_ops = 0 without Cutout is the identity. Mutants
    caught: ops/values drawn once in Python when the view is built (one
    outcome for the whole dataset); the loop applying range(1) ops."""
    k, out = _chain(3, n=200)
    distinct = {np.round(o * 255).astype(np.uint8).tobytes() for o in out}
    assert len(distinct) >= 150
    unchanged = np.mean([np.allclose(o * 255, k, atol=1e-3) for o in out])
    assert unchanged < 0.05
    x = tf.constant(k, tf.float32) / 255.0
    assert np.allclose(ra.rand_augment(0, 0.0)(x), x)


def test_op_count_and_value_distribution():
    """sample_ops: num_ops indices, uniform over the 14 ops (chi-square over
    4200 draws), values uniform over each op's [lo, hi) (KS-like check on the
    rescaled values). Mutants caught: index range 13 (one op never drawn),
    values over [lo, lo + (hi - lo) / 2) (Keras-like magnitude 0.5), fixed v."""
    index, values = tf.function(lambda: ra.sample_ops(4200))()
    index, values = index.numpy(), values.numpy()
    counts = np.bincount(index, minlength=14)
    assert len(counts) == 14 and counts.min() > 200
    chi2 = ((counts - 300.0) ** 2 / 300.0).sum()
    assert chi2 < 40.0  # 13 dof: p ~ 1e-4
    lo = np.array([o[1] for o in ra.OPS])[index]
    hi = np.array([o[2] for o in ra.OPS])[index]
    u = np.sort((values - lo) / (hi - lo))
    assert u.min() >= 0 and u.max() < 1
    assert np.abs(u - (np.arange(len(u)) + 0.5) / len(u)).max() < 0.03


@pytest.mark.parametrize("c", [1, 3])
def test_strong_view_shapes_and_range(c):
    """augment.strong (weak + RandAugment + Cutout) on 8x8 images of 1 and 3
    channels inside tf.data: float32 [8, 8, C] in [0, 1], the Cutout fill
    present in some. Mutant caught: cutout with channel-0 fill broadcast
    wrongly (shape error), strong ignoring cutout_fraction."""
    k = _image(5, 8, 8, c)
    ds = tf.data.Dataset.from_tensors(k).repeat(32).map(augment.strong(8, c, pad=1))
    out = np.stack(list(ds.as_numpy_iterator()))
    assert out.shape == (32, 8, 8, c) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    fill = np.array((125, 123, 114) if c == 3 else (123,)) / 255.0
    hit = np.all(np.abs(out - fill) < 1e-6, axis=-1).any(axis=(1, 2))
    assert hit.mean() > 0.3
    with pytest.raises(ValueError):
        augment.strong(8, c, magnitude=0.5)
