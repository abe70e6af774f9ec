"""MixMatch's batch interleaving, its L2 unlabeled loss and its ramp-up."""

from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf


def interleave_offsets(batch: int, num_groups: int) -> List[int]:
    """Row offsets that cut a batch of ``batch`` rows into ``num_groups`` near-equal
    slices (the larger slices last): ``[0, ..., batch]``, length num_groups + 1."""
    if num_groups < 1 or batch < num_groups:
        raise ValueError(f"cannot cut {batch} rows into {num_groups} slices.")
    sizes = [batch // num_groups] * num_groups
    for i in range(batch - sum(sizes)):
        sizes[num_groups - 1 - i] += 1
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return offsets


def interleave(batches: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """Swaps slices between G equal-size batches: slice g of batch 0 trades
    places with slice g of batch g, so batch 0 holds a slice of every batch and
    every other batch a slice of batch 0.

    MixMatch runs one forward per batch; with the (mixed) labeled batch first,
    every forward then sees labeled and unlabeled rows, and the first forward,
    the only one whose batch-norm statistics are kept, sees all of them. The swap is its own inverse: ``interleave(interleave(b)) == b``
    (apply it again to the logits to put rows back in order).

    Args:
      batches: G tensors [B, ...] with the same B.

    Returns:
      G tensors [B, ...].
    """
    g = len(batches)
    b = batches[0].shape[0]
    if b is not None and all(t.shape[0] is not None for t in batches):
        if any(t.shape[0] != b for t in batches):
            raise ValueError("interleave needs equal batch sizes, got "
                             f"{[t.shape[0] for t in batches]}.")
        cuts = interleave_offsets(b, g)
    else:  # batch size known only at run time: the same cuts, as tensors
        b = tf.shape(batches[0])[0]
        for t in batches[1:]:
            tf.debugging.assert_equal(tf.shape(t)[0], b, "interleave needs equal batch sizes")
        extra = tf.cast(tf.range(g) >= g - (b - g * (b // g)), tf.int32)
        cuts = tf.concat([[0], tf.cumsum(b // g + extra)], 0)
        cuts = [cuts[s] for s in range(g + 1)]
    pieces = [[t[cuts[s]:cuts[s + 1]] for s in range(g)] for t in batches]
    for s in range(1, g):
        pieces[0][s], pieces[s][s] = pieces[s][s], pieces[0][s]
    return [tf.concat(p, axis=0) for p in pieces]


@tf.function(jit_compile=True, reduce_retracing=True)
def l2_unlabeled_loss(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """``L_u = 1/(N C) sum_i sum_c (q_ic - softmax(z_i)_c)^2``: the squared error
    between the (mixed) guessed labels and the predictions, averaged over the
    rows AND the classes."""
    return tf.reduce_mean(tf.square(targets - tf.nn.softmax(logits, axis=-1)))


def linear_rampup(images_seen: tf.Tensor, rampup_images: float) -> tf.Tensor:
    """``clip(images_seen / rampup_images, 0, 1)`` (1 when rampup_images is 0)."""
    if rampup_images <= 0:
        return tf.constant(1.0)
    return tf.clip_by_value(tf.cast(images_seen, tf.float32) / float(rampup_images), 0.0, 1.0)
