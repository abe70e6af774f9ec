"""Model FLOPs as PERFORMANCE.md counts them: convolutions and matmuls only,
2 FLOPs per multiply-add, forward pass, per image."""

from __future__ import annotations

import keras
import numpy as np


def forward_flops(model) -> int:
    """Forward FLOPs of one image through ``model`` at its built input size.

    Conv2D: ``2 * H_out * W_out * C_out * k_h * k_w * C_in / groups``;
    Dense: ``2 * d_in * d_out`` (per row of a 2-D input). Nested models are
    walked; other layers (BN, activations, pooling) are not counted.
    """
    if isinstance(model, keras.layers.Dense) and not isinstance(model, keras.Model):
        d_in, d_out = model.kernel.shape  # a lone head on a [B, D] feature vector
        return int(2 * d_in * d_out)
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += forward_flops(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w, c_in_per_group, _ = layer.kernel.shape
            total += 2 * h * w * c_out * k_h * k_w * c_in_per_group
        elif isinstance(layer, keras.layers.Dense):
            d_in, d_out = layer.kernel.shape
            rows = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
            total += 2 * rows * d_in * d_out
    return int(total)
