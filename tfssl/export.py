"""Serving SavedModels for the encoder and the classifier.

``serving_default`` takes ``images``: uint8 [B, H, W, C] of any H, W; it
resizes to the model's input size and scales to [0, 1] in-graph (the
encoder's own layer then normalises), and returns ``{"features": [B, D]}``
(encoder) or ``{"probabilities": [B, C], "features": [B, D]}`` (classifier).
The SavedModels load with ``tf.saved_model.load`` without tfssl installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from typing import Dict

import keras
import tensorflow as tf


def _preprocess(images, size):
    x = tf.cast(images, tf.float32) / 255.0
    return tf.image.resize(x, size, antialias=True)


def _write(models, fn, channels, path):
    """Writes the SavedModel to a temporary sibling of ``path``, then renames
    it into place: a reader sees the previous export (or none, between the two
    renames), never a half-written one, and a kill leaves at most a
    ``.tmp-*`` folder that the next export replaces."""
    archive = keras.export.ExportArchive()
    for m in models:
        archive.track(m)
    archive.add_endpoint(
        name="serving_default", fn=fn,
        input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")])
    path = os.path.normpath(path)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    for stale in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed export
    archive.write_out(tmp, verbose=False)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def export_encoder(encoder: keras.Model, path: str) -> str:
    """Writes the encoder's serving SavedModel to ``path``."""
    h, w, c = encoder.input_shape[1:]

    def serve(images):
        feats = encoder(_preprocess(images, [h, w]), training=False)
        return {"features": tf.cast(feats, tf.float32)}
    return _write([encoder], serve, c, path)


def export_classifier(encoder: keras.Model, head: keras.layers.Layer, path: str,
                      gives_probabilities: bool = False) -> str:
    """Writes the classifier's serving SavedModel (probabilities and features).
    ``head`` maps features to logits, or to probabilities if ``gives_probabilities``
    (PAWS's soft nearest-neighbour head with its supports inside)."""
    h, w, c = encoder.input_shape[1:]

    def serve(images):
        feats = tf.cast(encoder(_preprocess(images, [h, w]), training=False), tf.float32)
        out = tf.cast(head(feats), tf.float32)
        probs = out if gives_probabilities else tf.nn.softmax(out, -1)
        return {"probabilities": probs, "features": feats}
    return _write([encoder, head], serve, c, path)


def export_model(model, export_dir: str, use_ema: bool = False, labeled=None) -> Dict[str, str]:
    """Exports ``model.encoder`` (and its classifier, if any) under ``export_dir``.

    Args:
      model: an ``SSLModel``.
      export_dir: e.g. ``saved_models/<run>``; gets ``encoder/`` and ``classifier/``
        (and ``finetuned/`` for a model that was fine-tuned by its evaluation).
      use_ema: export the EMA weights (for methods that evaluate with them).
      labeled: the labeled evaluation dataset, for classifiers that embed the
        labeled images (PAWS); without it such a model exports its encoder only.

    Returns: {"encoder": path, "classifier": path (if the model has one), ...}.
    """
    os.makedirs(export_dir, exist_ok=True)
    paths = {}
    with (model.ema_applied() if use_ema else contextlib.nullcontext()):
        paths["encoder"] = export_encoder(model.encoder, os.path.join(export_dir, "encoder"))
        head = model.serving_head(labeled)
        if head is not None:
            paths["classifier"] = export_classifier(
                model.encoder, head[0], os.path.join(export_dir, "classifier"), head[1])
    finetuned = getattr(model, "finetuned", None)
    if finetuned is not None:
        paths["finetuned"] = export_classifier(*finetuned, os.path.join(export_dir, "finetuned"))
    return paths

