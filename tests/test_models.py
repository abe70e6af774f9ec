"""Backbones and heads: output shapes and sizes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import models


@pytest.mark.parametrize("name,shape,dim", [
    ("small_cnn", (8, 8, 1), 64),
    ("resnet18", (32, 32, 3), 512),
    ("resnet50", (64, 64, 3), 2048),
    ("wrn28_2", (32, 32, 3), 128),
])
def test_backbone_output_shapes(name, shape, dim):
    net = models.get_backbone(name, shape)
    out = net(tf.zeros((2,) + shape), training=False)
    assert out.shape == (2, dim)


def test_resnet_stems():
    assert models.resnet(18, (32, 32, 3), cifar_stem=True).get_layer("stage1_block0_conv1").output.shape[1] == 32
    assert models.resnet(18, (64, 64, 3), cifar_stem=False).get_layer("stage1_block0_conv1").output.shape[1] == 16


def test_wide_resnet_28_2_has_about_1_5m_parameters():
    net = models.wide_resnet(28, 2, (32, 32, 3))
    n = sum(int(np.prod(v.shape)) for v in net.trainable_variables)
    assert 1.4e6 < n < 1.55e6
    assert any(l.__class__.__name__ == "LeakyReLU" for l in net.layers)
    bns = [l for l in net.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(b.momentum == 0.999 for b in bns)


def test_wrn28_8_is_wider():
    assert models.get_backbone("wrn28_8", (32, 32, 3)).output_shape == (None, 512)


def test_bad_backbone_and_norm():
    with pytest.raises(ValueError, match="--backbone='vgg'"):
        models.get_backbone("vgg", (32, 32, 3))
    with pytest.raises(ValueError, match="norm="):
        models.small_cnn(norm="layer")


def test_mlp_heads_and_encoder_normalisation():
    head = models.mlp([32, 16], input_dim=8, batch_norm=True)
    assert head(tf.zeros([4, 8])).shape == (4, 16)
    assert sum("bn" in l.name for l in head.layers) == 1
    enc = models.encoder(models.small_cnn((8, 8, 1), norm="none"), mean=(0.5,), std=(0.25,))
    norm = enc.get_layer("normalize")
    np.testing.assert_allclose(norm(tf.fill([1, 8, 8, 1], 0.75)).numpy(), 1.0, rtol=1e-5)


def test_forward_flops_match_the_published_figures():
    from tfssl.models.flops import forward_flops

    # PERFORMANCE.md: WRN-28-2 at 32x32 0.429 GFLOP; ResNet-18 (CIFAR stem) 1.110.
    assert forward_flops(models.wide_resnet(28, 2, (32, 32, 3))) / 1e9 == pytest.approx(0.429, abs=0.002)
    assert forward_flops(models.resnet(18, (32, 32, 3), cifar_stem=True)) / 1e9 == pytest.approx(1.110, abs=0.005)
    head = models.mlp([32, 16], input_dim=8)
    assert forward_flops(head) == 2 * (8 * 32 + 32 * 16)


def test_wrn_shortcuts_as_official_mixmatch():
    # Stage 1's first shortcut projects the activated input; stages 2-3 project
    # the raw block input (the previous Add), as in the official architecture.
    from tfssl.models import backbones

    m = backbones.wide_resnet(28, 2, (32, 32, 3))
    for stage, want in ((1, "leaky_re_lu"), (2, "add"), (3, "add")):
        down = m.get_layer(f"stage{stage}_block0_down")
        source = down._inbound_nodes[0].parent_nodes[0].operation.name
        assert source.startswith(want), (stage, source)


def test_fused_batch_norm_matches_keras_batch_norm():
    """Forward (training and inference), gradients and moving statistics equal
    Keras's BatchNormalization; non-4-D inputs take the Keras path."""
    from tfssl.models.backbones import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (6, 4, 5, 3)).astype("float32"))
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-3)
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    for layer in (fused, plain):
        layer.build(x.shape)
        layer.set_weights([np.array([1.5, 0.5, 2.0], "float32"), np.array([0.1, -0.2, 0.3], "float32"),
                           np.zeros(3, "float32"), np.ones(3, "float32")])
    w = tf.constant(rng.normal(size=x.shape).astype("float32"))
    outs, grads = [], []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(w * y)
        outs.append(y.numpy())
        grads.append([g.numpy() for g in tape.gradient(loss, [x, layer.gamma, layer.beta])])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-4)
    flat = x.numpy().reshape(-1, 3)
    np.testing.assert_allclose(fused.moving_mean.numpy(), 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), 0.9 + 0.1 * flat.var(0), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), atol=1e-5)
    v = tf.constant(rng.normal(size=(6, 3)).astype("float32"))  # 2-D: the Keras path
    np.testing.assert_allclose(FusedBatchNormalization()(v, training=True),
                               keras.layers.BatchNormalization()(v, training=True), atol=1e-5)
    x64 = tf.cast(x, tf.float64)  # float64: the Keras path (the fused kernel has no float64)
    np.testing.assert_allclose(FusedBatchNormalization(dtype="float64")(x64, training=True),
                               keras.layers.BatchNormalization(dtype="float64")(x64, training=True),
                               atol=1e-10)  # float64 precision, which a float32 kernel lacks
    assert isinstance(models.get_backbone("small_cnn", (8, 8, 1)).get_layer("bn0"),
                      FusedBatchNormalization)


def _mixmatch_tf_wrn_params(filters, scales, repeat=4, channels=3):
    """Parameters (trainable and BN moving statistics) of MixMatch-TF's
    ``ResNet.classifier`` (libml/models.py) without its dense head, counted from
    its structure: a 3x3 stem to 16 channels; per scale s, ``repeat`` residual
    blocks at ``filters << s`` (BN-act, 3x3, BN-act, 3x3, 1x1 projection when
    the width changes); a final BN. Convolutions without bias (tfssl's D1); a
    BN has 4 numbers per channel (gamma, beta, mean, variance)."""
    total, c = 9 * channels * 16, 16
    for s in range(scales):
        f = filters << s
        for _ in range(repeat):
            total += 4 * c + 9 * c * f + 4 * f + 9 * f * f + (c * f if c != f else 0)
            c = f
    return total + 4 * c


@pytest.mark.parametrize("name,shape,filters,scales", [
    ("wrn28_2", (32, 32, 3), 32, 3),
    ("wrn28_8", (32, 32, 3), 128, 3),
    ("wrn28_f135", (32, 32, 3), 135, 3),  # MixMatch-TF CIFAR-100 (runs/table1.sh:18)
    ("wrn28_2_s4", (96, 96, 3), 32, 4),  # MixMatch-TF STL-10 --scales=4 (runs/table2.sh:18)
])
def test_wide_resnet_is_mixmatch_tfs_filters_and_scales(name, shape, filters, scales):
    """``wrn<depth>_f<filters>`` and ``_s<scales>`` build MixMatch-TF's network
    with its ``--filters`` / ``--scales``: the parameter count equals the count
    from the official structure, the output has ``filters << (scales - 1)``
    channels, and each scale after the first halves the side.

    Mutants: stage widths still 16 x width (135 -> 128: count off); ``_s4``
    ignored (3 stages: count and output off); the stride-2 block missing on the
    fourth scale (side 24 instead of 12)."""
    net = models.get_backbone(name, shape)
    assert net.count_params() == _mixmatch_tf_wrn_params(filters, scales)
    assert net.output_shape == (None, filters << (scales - 1))
    last = net.get_layer(f"stage{scales}_block3_conv2")
    assert last.output.shape[1] == shape[0] // 2 ** (scales - 1)


def test_backbone_names_are_checked():
    """Unknown names fail in TrainConfig.validate and get_backbone alike
    (mutant: a regex that admits ``wrn28_``)."""
    from tfssl.train import ConfigError, TrainConfig

    for bad in ("wrn28_", "wrn28_f", "wrn_2", "wrn28_2_s"):
        with pytest.raises(ConfigError):
            TrainConfig(backbone=bad).validate()
        with pytest.raises(ValueError):
            models.get_backbone(bad, (32, 32, 3))
    TrainConfig(backbone="wrn28_f135").validate()
