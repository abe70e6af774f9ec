"""Dataset sources, SSL splits and multi-view pipelines."""

from tfssl.data.pipeline import evaluation, semi_supervised
from tfssl.data.sources import (DATASETS, TFDS_SPECS, Source, digits, get_source,
                                image_folder, tfds_source)
from tfssl.data.support import labeled_images, support_indices, support_stream
from tfssl.data.splits import labeled_split, unlabeled_ids, write_labeled_ids
