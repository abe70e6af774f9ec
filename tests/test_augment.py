"""Views: shapes, ranges, and per-image randomness."""

import numpy as np
import pytest
import tensorflow as tf

from tfssl import augment


def _image(h=32, w=32, c=3, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, [h, w, c]), tf.uint8)


def _check(x, size, c):
    assert x.shape == (size, size, c) and x.dtype == tf.float32
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0


@pytest.mark.parametrize("c", [1, 3])
def test_every_view_has_its_shape_and_range(c):
    img = _image(c=c)
    _check(augment.identity(32)(img), 32, c)
    _check(augment.weak(32, c)(img), 32, c)
    _check(augment.weak(24, c, resized_crop_scale=(0.2, 1.0))(img), 24, c)
    _check(augment.strong(32, c)(img), 32, c)
    _check(augment.simclr(16, c, solarize_p=0.5)(img), 16, c)
    crops = augment.multicrop(32, 12, 2, 3, channels=c)
    assert sorted(crops) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    _check(crops["global_1"](img), 32, c)
    _check(crops["local_2"](img), 12, c)


def test_views_run_in_tf_data_with_per_image_randomness():
    img = _image()
    ds = tf.data.Dataset.from_tensors(img).repeat(16).map(augment.strong(32, 3, cutout_fraction=0))
    outs = np.stack(list(ds.as_numpy_iterator()))
    distinct = {np.round(o, 4).tobytes() for o in outs}
    assert len(distinct) >= 12  # ops and magnitudes drawn per image, not once per batch


def test_weak_view_is_a_translation_of_the_image():
    img = _image(8, 8, 1)
    x = augment.weak(8, 1, flip=False, pad=1)(img).numpy()[..., 0]
    base = img.numpy()[..., 0] / 255.0
    # The centre 6x6 of the input appears in the output shifted by at most 1 px.
    hits = [np.allclose(x[1 + dy:7 + dy, 1 + dx:7 + dx], base[1:7, 1:7], atol=1e-6)
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert any(hits)


def test_cutout_fills_a_square_with_grey():
    tf.random.set_seed(1)
    x = tf.ones([16, 16, 3])
    found = False
    for _ in range(20):
        y = augment.cutout(x, 0.5).numpy()
        filled = np.all(y == 0.5, axis=-1)
        if filled.any():
            ys, xs = np.nonzero(filled)
            # a rectangle (clipped square): every cell of its bounding box is filled
            assert filled[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
            assert np.ptp(ys) + 1 <= 8 and np.ptp(xs) + 1 <= 8
            found = True
        assert set(np.unique(y)) <= {0.5, 1.0}
    assert found


def test_random_resized_crop_area_fraction():
    tf.random.set_seed(0)
    x = tf.reshape(tf.range(100 * 100, dtype=tf.float32) / 1e4, [100, 100, 1])
    for _ in range(5):
        out = augment.random_resized_crop(x, 10, scale=(0.2, 0.3), ratio=(0.9, 1.1)).numpy()
        # A ~45-55 px square crop of a ramp whose rows step by 0.01: the output's
        # first and last rows are ~0.9 * side rows apart (whole image: ~0.9).
        span_rows = out[-1, 0, 0] - out[0, 0, 0]
        assert 0.3 < span_rows < 0.6


def test_random_apply_probability():
    tf.random.set_seed(0)
    f = augment.random_apply(lambda x: x + 1.0, 0.3)
    hits = np.mean([float(f(tf.zeros([]))) for _ in range(400)])
    assert 0.22 < hits < 0.38


def test_center_crop_takes_the_middle():
    img = tf.constant(np.arange(16 * 16, dtype=np.uint8).reshape(16, 16, 1))
    out = augment.center_crop(14, crop_fraction=14 / 16)(img).numpy()[..., 0]
    np.testing.assert_allclose(out, img.numpy()[1:15, 1:15, 0] / 255.0, atol=1e-6)


# --- torchvision's colour semantics (the official MoCo v2 / SimCLR / PAWS views) ---

def _luma(x):
    return x @ np.array([0.2989, 0.587, 0.114])


def _rng_image(h=6, w=5, lo=0.05, hi=0.95, seed=3):
    return np.random.default_rng(seed).uniform(lo, hi, (h, w, 3)).astype(np.float32)


def test_colour_adjustments_match_torchvision_formulas():
    """Each adjustment against NumPy written from torchvision's definitions
    (blend with black / the mean luma / the per-pixel luma; hue rotated in HSV).
    Mutants: contrast around the per-channel mean (tf.image.adjust_contrast);
    saturation through HSV scaling (tf.image.adjust_saturation); additive
    brightness; hue not wrapped."""
    import colorsys

    x = _rng_image()
    t = tf.constant(x)
    np.testing.assert_allclose(augment.adjust_brightness(t, 1.3), np.clip(1.3 * x, 0, 1),
                               atol=1e-6)
    m = _luma(x).mean()
    np.testing.assert_allclose(augment.adjust_contrast(t, 0.7),
                               np.clip(0.7 * x + 0.3 * m, 0, 1), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_contrast(t, 1.4),
                               np.clip(1.4 * x - 0.4 * m, 0, 1), atol=1e-6)
    g = _luma(x)[..., None]
    np.testing.assert_allclose(augment.adjust_saturation(t, 1.35),
                               np.clip(1.35 * x - 0.35 * g, 0, 1), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_saturation(t, 0.0), np.repeat(g, 3, -1),
                               atol=1e-6)
    for h in (0.3, -0.45):
        ref = np.array([[colorsys.hsv_to_rgb((hh + h) % 1.0, s, v)
                         for hh, s, v in (colorsys.rgb_to_hsv(*p) for p in row)]
                        for row in x])
        np.testing.assert_allclose(augment.adjust_hue(t, h), ref, atol=1e-5)
    np.testing.assert_allclose(augment.grayscale(t)[..., 0], _luma(x), atol=1e-6)


def test_color_jitter_draws_torchvision_factors():
    """``color_jitter(0.4, 0, 0, 0)`` scales each image by one b in [0.6, 1.4];
    ``color_jitter(0, 0, 0.4, 0)`` blends with the luma by one s in [0.6, 1.4].
    Mutant: Keras's RandomColorJitter (additive brightness; saturation f / (1 -
    f), which is negative for f > 1 and turns about a third of the images gray,
    the old bug)."""
    tf.random.set_seed(0)
    x = _rng_image(lo=0.2, hi=0.6)
    g = _luma(x)[..., None]
    bright, sat = augment.color_jitter(0.4, 0, 0, 0), augment.color_jitter(0, 0, 0.4, 0)
    bs, ss = [], []
    for _ in range(40):
        y = bright(tf.constant(x)).numpy()
        b = y / x
        np.testing.assert_allclose(b, b.flat[0], rtol=1e-5)  # one factor, multiplicative
        bs.append(b.flat[0])
        y = sat(tf.constant(x)).numpy()
        s = ((y - g) / (x - g)).ravel()
        s = s[np.abs((x - g).ravel()) > 0.05]
        np.testing.assert_allclose(s, s[0], rtol=1e-3)
        ss.append(s[0])
    for f in (bs, ss):
        assert 0.6 - 1e-5 <= min(f) < 0.7 and 1.3 < max(f) <= 1.4 + 1e-5, (min(f), max(f))


def test_gaussian_blur_matches_a_gaussian_filter_with_edge_extension():
    """Against scipy's Gaussian filter (mode 'nearest': PIL extends the edge
    pixels) with the same taps. Mutant: a 3-tap kernel (Keras's
    RandomGaussianBlur(kernel_size=3), which barely blurs at sigma 2)."""
    from scipy import ndimage

    x = _rng_image(20, 17)
    for sigma in (0.5, 1.7):
        ref = np.stack([ndimage.gaussian_filter(x[..., c], sigma, mode="nearest",
                                                truncate=6 / sigma) for c in range(3)], -1)
        np.testing.assert_allclose(augment.gaussian_blur(tf.constant(x), sigma), ref,
                                   atol=1e-5)
    tiny = augment.gaussian_blur(tf.constant(x[:3, :2]), 2.0)  # smaller than the kernel
    assert tiny.shape == (3, 2, 3)
