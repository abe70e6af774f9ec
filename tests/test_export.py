"""Export round trip: the SavedModels load and serve in a process without tfssl."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf

from tfssl import export, methods, models


def test_export_round_trip_in_a_process_that_never_imports_tfssl(tmp_path):
    keras.utils.set_random_seed(0)
    enc = models.encoder(models.small_cnn((8, 8, 1), width=8), (0.3,), (0.3,))
    model = methods.Supervised(enc, 10, ema_decay=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    rng = np.random.default_rng(0)
    batch = {"labeled": {"weak": rng.uniform(0, 1, [8, 8, 8, 1]).astype("float32"),
                         "label": np.arange(8) % 10}}
    for _ in range(3):
        model.train_on_batch(batch)
    paths = export.export_model(model, str(tmp_path / "run"), use_ema=True)
    images = rng.integers(0, 256, [3, 16, 16, 1]).astype("uint8")  # any size: resized in-graph
    np.save(tmp_path / "images.npy", images)
    x = tf.image.resize(images.astype("float32") / 255.0, [8, 8], antialias=True)
    with model.ema_applied():
        want_feats = model.encoder(x).numpy()
        want_probs = tf.nn.softmax(model(x)).numpy()
    online_probs = tf.nn.softmax(model(x)).numpy()
    assert not np.allclose(online_probs, want_probs, atol=1e-4)  # EMA differs from online

    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, tensorflow as tf
        images = np.load({str(tmp_path / 'images.npy')!r})
        enc = tf.saved_model.load({paths['encoder']!r}).signatures["serving_default"]
        clf = tf.saved_model.load({paths['classifier']!r}).signatures["serving_default"]
        f = enc(images=tf.constant(images))["features"].numpy()
        out = clf(images=tf.constant(images))
        print(json.dumps({{"features": f.tolist(),
                          "probabilities": out["probabilities"].numpy().tolist(),
                          "tfssl_imported": any(m.startswith("tfssl") for m in sys.modules)}}))
    """)
    env = dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not got["tfssl_imported"]
    np.testing.assert_allclose(got["features"], want_feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["probabilities"], want_probs, rtol=1e-4, atol=1e-5)
