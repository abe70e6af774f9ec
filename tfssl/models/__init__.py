"""Backbones and heads."""

from tfssl.models.backbones import (BACKBONES, NORMS, get_backbone, resnet, small_cnn,
                                    wide_resnet)
from tfssl.models.heads import accept_any_image_size, encoder, mlp
