"""One input pipeline's slice of every global batch (multi-worker input).

Every worker draws the same element order; each keeps the rows of every
global batch that its replicas train on, before any augmentation, so that no
worker decodes or augments images another one trains on. See
``tfssl.data.pipeline``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import tensorflow as tf


def shard_slice(batch_size: int, input_context: Optional[tf.distribute.InputContext]
                ) -> Tuple[int, int, int]:
    """(first row, rows, per-replica batch) of this input pipeline's slice of
    every global batch of ``batch_size`` rows; the whole batch without a context."""
    if input_context is None:
        return 0, batch_size, batch_size
    n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    replicas = input_context.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"a global batch of {batch_size} does not split over {replicas} "
                         "replicas.")
    rows = batch_size // n
    return i * rows, rows, batch_size // replicas


def keep_slice(ds: tf.data.Dataset, batch_size: int, first: int, rows: int) -> tf.data.Dataset:
    """The elements at offsets [first, first + rows) of every run of
    ``batch_size`` consecutive elements."""
    if rows == batch_size:
        return ds
    return (ds.enumerate()
            .filter(lambda i, e: tf.logical_and(i % batch_size >= first,
                                                i % batch_size < first + rows))
            .map(lambda i, e: e))
