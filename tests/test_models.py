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


def _np_conv(x, w, stride, pad_before, pad_after):
    """NumPy reference: zero-pad ``x`` [B, H, W, C] by (before, after) on each
    spatial side, then a ``valid`` strided cross-correlation with w [k, k, C, F]."""
    x = np.pad(x, [(0, 0), (pad_before, pad_after), (pad_before, pad_after), (0, 0)])
    k = w.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("bhwc,hwcf->bf", patch, w)
    return out


@pytest.mark.parametrize("kernel", [3, 7])
def test_strided_conv_padding_torch_pads_every_side_tf_only_after(kernel):
    """padding="torch" is PyTorch's Conv2d(padding=k // 2): k // 2 zeros on every
    side of an even input; "tf" is TF's "same": (k - 2) // 2 before, k // 2 after
    (for stride 2 on an even side). Catches: "torch" built as "same" (the D1
    deviation of PARITY.md), or pad k // 2 only before."""
    from tfssl.models import backbones

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 12, 3)).astype("float32")
    w = rng.normal(size=(kernel, kernel, 3, 4)).astype("float32")
    refs = {"torch": _np_conv(x, w, 2, kernel // 2, kernel // 2),
            "tf": _np_conv(x, w, 2, (kernel - 2) // 2, kernel // 2)}
    for padding, ref in refs.items():
        inp = keras.Input((12, 12, 3))
        net = keras.Model(inp, backbones._conv(4, kernel, 2, name="c", padding=padding)(inp))
        net.get_layer("c").kernel.assign(w)
        got = net(x).numpy()
        assert got.shape == ref.shape == (2, 6, 6, 4)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=padding)
    assert not np.allclose(refs["torch"], refs["tf"], atol=1e-2)


def test_resnet_torch_stem_pools_as_torchvision():
    """The ImageNet stem with padding="torch": 7x7/2 conv padded 3 all round, then
    MaxPool2d(3, 2, padding=1) (torchvision). Checked on the pool's output
    against NumPy max pooling of the ReLU output with -inf padding. Catches a
    pool padded only after (TF "same")."""
    net = models.resnet(18, (64, 64, 3), cifar_stem=False, norm="none", padding="torch")
    pool = next(l for l in net.layers if isinstance(l, keras.layers.MaxPooling2D))
    relu_out = net.get_layer("stem_pool_pad").input
    probe = keras.Model(net.input, [relu_out, pool.output])
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    a, got = (t.numpy() for t in probe(x))
    padded = np.pad(a, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-np.inf)
    ref = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                              for j in range(16)], 1) for i in range(16)], 1)
    assert got.shape == ref.shape == (2, 16, 16, 64)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_default_padding_follows_each_backbones_official_code():
    """ResNets pad as torchvision (every official ResNet recipe is PyTorch), the
    WideResNets as google-research's TF networks; ``padding`` overrides. Catches
    a default of "tf" for the ResNets (D1) or "torch" for the WRNs."""
    def padded(net):
        return any(isinstance(l, keras.layers.ZeroPadding2D) for l in net.layers)

    assert padded(models.get_backbone("resnet18", (32, 32, 3)))
    assert padded(models.get_backbone("resnet50", (64, 64, 3)))
    assert not padded(models.get_backbone("wrn28_2", (32, 32, 3)))
    assert padded(models.get_backbone("wrn28_2", (32, 32, 3), padding="torch"))
    assert not padded(models.get_backbone("resnet18", (32, 32, 3), padding="tf"))
    with pytest.raises(ValueError, match="padding="):
        models.get_backbone("resnet18", (32, 32, 3), padding="reflect")


def test_wrn_forms_have_the_official_parameter_counts():
    """Trainable parameters of WRN-28-2 (no classifier), counted on the official
    PyTorch modules: USB ``wrn_28_2`` 1,466,336, of which 192 belong to the bn1 of
    the first blocks of stages 2-3 that USB computes and drops (left out here);
    suncet ``wide_resnet28w2`` 1,468,352 (biases on every conv, no stem BN).
    Catches: a missing conv bias, a stem BN in suncet's form, the dropped bn1
    kept, the TF form under another name. benchmarks/parity/backbones.py checks
    the functions themselves against the official modules (PARITY.md)."""
    def count(name):
        net = models.get_backbone(name, (32, 32, 3))
        return sum(int(np.prod(v.shape)) for v in net.trainable_variables)

    assert count("wrn28_2_usb") == 1466336 - 192
    assert count("wrn28_2_suncet") == 1468352
    assert count("wrn28_2") == 1466320


def test_wrn_forms_wire_the_first_strided_block_as_their_official_code():
    """Where the first block of stage 2 takes conv1's input, and where its stride
    is. tf: conv1 (strided) on the activated input; usb: conv1 (strided) on the
    RAW input, the previous block's sum (USB's ``conv1(out if equalInOut else
    x)``); suncet: conv1 at stride 1 on the activated input, conv2 strided.
    Catches each form built as another."""
    def conv_input(net, layer):
        t = net.get_layer(layer).input
        pad = next((l for l in net.layers if l.name == f"{layer}_pad"), None)
        return pad.input if pad is not None else t

    def source_layer(net, tensor):
        return next(l for l in net.layers if l.output is tensor)

    tf_net = models.get_backbone("wrn28_2", (32, 32, 3))
    usb = models.get_backbone("wrn28_2_usb", (32, 32, 3))
    suncet = models.get_backbone("wrn28_2_suncet", (32, 32, 3))
    assert isinstance(source_layer(tf_net, conv_input(tf_net, "stage2_block0_conv1")),
                      keras.layers.LeakyReLU)
    assert isinstance(source_layer(usb, conv_input(usb, "stage2_block0_conv1")), keras.layers.Add)
    assert isinstance(source_layer(suncet, conv_input(suncet, "stage2_block0_conv1")),
                      keras.layers.ReLU)
    side = lambda net, name: net.get_layer(name).output.shape[1]
    assert side(tf_net, "stage2_block0_conv1") == side(usb, "stage2_block0_conv1") == 16
    assert side(suncet, "stage2_block0_conv1") == 32
    assert side(suncet, "stage2_block0_conv2") == 16
    assert not any(isinstance(l, keras.layers.LeakyReLU) for l in suncet.layers)
    # the PyTorch forms pad their strided convs as PyTorch (D1)
    assert [l.name for l in usb.layers if isinstance(l, keras.layers.ZeroPadding2D)] == [
        "stage2_block0_conv1_pad", "stage3_block0_conv1_pad"]
    assert [l.name for l in suncet.layers if isinstance(l, keras.layers.ZeroPadding2D)] == [
        "stage2_block0_conv2_pad", "stage3_block0_conv2_pad"]


def test_wrn_forms_bn_settings():
    """BN epsilon and momentum (Keras convention, 1 - PyTorch's): tf 1e-3 / 0.999;
    usb 1e-5 in the blocks, 1e-3 final, 0.999; suncet 1e-5, 0.9 in the blocks
    and 0.01 final (``nn.BatchNorm2d(momentum=0.99)``). Catches a form with
    another form's BN."""
    def bns(name):
        net = models.get_backbone(name, (32, 32, 3))
        return {l.name: (l.epsilon, l.momentum) for l in net.layers
                if isinstance(l, keras.layers.BatchNormalization)}

    assert set(bns("wrn28_2").values()) == {(1e-3, 0.999)}
    usb = bns("wrn28_2_usb")
    assert usb.pop("final_bn") == (1e-3, 0.999) and set(usb.values()) == {(1e-5, 0.999)}
    suncet = bns("wrn28_2_suncet")
    assert suncet.pop("final_bn") == (1e-5, 0.01) and set(suncet.values()) == {(1e-5, 0.9)}
