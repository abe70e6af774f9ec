"""Dataset sources: the bundled digits default, TFDS datasets by name, and
class-per-subfolder image folders.

A ``Source`` yields elements ``{"image": uint8 [H, W, C], "label": int64,
"index": int64}`` where ``index`` is the element's position in the train set
(0..num_train-1; extra unlabeled images, such as STL-10's ``unlabelled`` split,
follow at num_train..). Labels of unlabeled-only images are -1.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

DIGITS_TEST_SIZE = 497  # ~500 images, stratified, fixed seed (independent of --seed)
DIGITS_SPLIT_SEED = 20221124


@dataclasses.dataclass
class Source:
    """A train/test image-classification source.

    Attributes:
      name: dataset name.
      num_classes: number of classes C.
      image_shape: (H, W, C) that training views produce.
      train_labels: int64 [num_train], the train labels (-1 where unknown).
      mean, std: per-channel statistics of [0, 1] pixels, for the encoder's
        normalisation layer.
      num_extra_unlabeled: images only in the unlabeled stream (index >= num_train).
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_labels: np.ndarray
    mean: tuple
    std: tuple
    _train: Callable[[], tf.data.Dataset]
    _test: Callable[[], tf.data.Dataset]
    _extra: Optional[Callable[[], tf.data.Dataset]] = None
    num_extra_unlabeled: int = 0
    train_arrays: Optional[tuple] = None  # (images uint8 [N,H,W,C], labels) if in memory

    @property
    def num_train(self) -> int:
        return int(len(self.train_labels))

    def train(self) -> tf.data.Dataset:
        """Train set in index order, with ``index``."""
        return _with_index(self._train(), 0)

    def test(self) -> tf.data.Dataset:
        """Test set (no ``index`` needed, but given for symmetry)."""
        return _with_index(self._test(), 0)

    def extra_unlabeled(self) -> Optional[tf.data.Dataset]:
        """Unlabeled-only images (index >= num_train), or None."""
        if self._extra is None:
            return None
        return _with_index(self._extra(), self.num_train)

    def subset(self, indices: np.ndarray) -> tf.data.Dataset:
        """The train elements at ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.train_arrays is not None:
            images, labels = self.train_arrays
            return tf.data.Dataset.from_tensor_slices(
                {"image": images[indices], "label": labels[indices].astype(np.int64),
                 "index": indices}
            )
        mask = np.zeros([self.num_train], dtype=bool)
        mask[indices] = True
        mask_t = tf.constant(mask)
        return self.train().filter(lambda e: tf.gather(mask_t, e["index"]))


def _with_index(ds: tf.data.Dataset, offset: int) -> tf.data.Dataset:
    def add(i, e):
        return {"image": e["image"], "label": tf.cast(e["label"], tf.int64),
                "index": i + offset}
    return ds.enumerate().map(add)


def _array_source(name, num_classes, x_tr, y_tr, x_te, y_te) -> Source:
    x01 = x_tr.astype(np.float32) / 255.0
    mean = tuple(float(m) for m in x01.mean(axis=(0, 1, 2)))
    std = tuple(float(s) for s in x01.std(axis=(0, 1, 2)) + 1e-6)
    return Source(
        name=name,
        num_classes=num_classes,
        image_shape=tuple(x_tr.shape[1:]),
        train_labels=y_tr.astype(np.int64),
        mean=mean,
        std=std,
        _train=lambda: tf.data.Dataset.from_tensor_slices({"image": x_tr, "label": y_tr}),
        _test=lambda: tf.data.Dataset.from_tensor_slices({"image": x_te, "label": y_te}),
        train_arrays=(x_tr, y_tr.astype(np.int64)),
    )


def digits() -> Source:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images,
    10 classes. A fixed stratified test split of 497 images; 1,300 train."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return _array_source("digits", 10, x_tr, y_tr, x_te, y_te)


# Known TFDS image-classification datasets: splits, training image size, stats.
TFDS_SPECS = {
    "cifar10": dict(train="train", test="test", size=32,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)),
    "cifar100": dict(train="train", test="test", size=32,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "svhn_cropped": dict(train="train", test="test", size=32,
                         mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    "stl10": dict(train="train", test="test", extra="unlabelled", size=96,
                  mean=(0.4409, 0.4279, 0.3868), std=(0.2683, 0.2610, 0.2687)),
    "imagenet2012": dict(train="train", test="validation", size=224, manual=True,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
IMAGENET_STATS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def tfds_source(name: str, data_dir: Optional[str] = None,
                manual_dir: Optional[str] = None, image_size: Optional[int] = None,
                download: bool = False) -> Source:
    """Any TFDS image-classification dataset (features ``image`` and ``label``).

    Args:
      name: TFDS name, e.g. ``cifar10``, ``stl10``, ``imagenet2012``.
      data_dir: TFDS data directory (``--data_dir``).
      manual_dir: directory holding manually downloaded archives (ImageNet).
      image_size: training image side; required for datasets whose images vary
        in size and that are not in ``TFDS_SPECS``.
      download: prepare the dataset if it is not there (needs the network).

    Raises:
      ValueError: the dataset is unknown to TFDS, not prepared (and download is
        off), lacks image/label features, or needs ``image_size``.
    """
    import tensorflow_datasets as tfds

    spec = dict(TFDS_SPECS.get(name, dict(train="train", test="test")))
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir!r} does not exist.")
    if spec.get("manual") and manual_dir is not None and not os.path.isdir(manual_dir):
        raise ValueError(f"--manual_dir={manual_dir!r} does not exist.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises DatasetNotFoundError and friends
        raise ValueError(
            f"--dataset={name!r} is unknown: use digits, folder, or a TFDS "
            f"image-classification name such as {sorted(TFDS_SPECS)}."
        ) from e
    if download:
        dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=dl_config)
    feats = builder.info.features
    if "image" not in feats or "label" not in feats:
        raise ValueError(f"--dataset={name!r} has no 'image' and 'label' features.")
    num_classes = int(feats["label"].num_classes)
    shape = tuple(feats["image"].shape)
    size = image_size or spec.get("size") or (shape[0] if shape[0] else None)
    if size is None:
        raise ValueError(f"--dataset={name!r} has images of varying size: set --image_size.")
    channels = shape[2] if len(shape) == 3 and shape[2] else 3
    stats = {k: spec.get(k, IMAGENET_STATS[k][:1] * channels if channels == 1 else IMAGENET_STATS[k])
             for k in ("mean", "std")}

    def load(split, skip_decoding=False):
        decoders = {"image": tfds.decode.SkipDecoding()} if skip_decoding else None
        try:
            ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        except AssertionError as e:  # tfds: "Dataset ... not found / not prepared"
            hint = (f"--data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir")
            extra = " and --manual_dir (the ImageNet archives)" if spec.get("manual") else ""
            raise ValueError(
                f"--dataset={name!r} is not prepared in {hint}: prepare it with "
                f"`tfds build {name}` (or pass --download){extra}. ({e})"
            ) from e
        return ds.map(lambda e: {"image": e["image"], "label": e["label"]})

    labels = _read_labels(load(spec["train"], skip_decoding=True), f"{name} labels")
    extra = None
    num_extra = 0
    if spec.get("extra"):
        extra = lambda: load(spec["extra"]).map(
            lambda e: {"image": e["image"], "label": -tf.ones_like(e["label"])})
        num_extra = int(load(spec["extra"], skip_decoding=True).cardinality())
        if num_extra < 0:  # unknown cardinality: count the records
            num_extra = int(load(spec["extra"], skip_decoding=True).reduce(0, lambda n, _: n + 1))
    return Source(
        name=name, num_classes=num_classes, image_shape=(size, size, channels),
        train_labels=labels, mean=tuple(stats["mean"]), std=tuple(stats["std"]),
        _train=lambda: load(spec["train"]), _test=lambda: load(spec["test"]),
        _extra=extra, num_extra_unlabeled=num_extra,
    )


def _read_labels(ds: tf.data.Dataset, what: str) -> np.ndarray:
    """All labels of ``ds`` (images not decoded), with a progress bar when long."""
    import keras

    n = int(ds.cardinality())
    chunk = 8192
    bar = keras.utils.Progbar(n, unit_name="image") if n > 20 * chunk else None
    if bar is not None:
        print(f"Reading {what} for the labeled split ({n} images, once per run)")
    out = []
    for b in ds.map(lambda e: e["label"]).batch(chunk).as_numpy_iterator():
        out.append(b)
        if bar is not None:
            bar.add(len(b))
    return np.concatenate(out or [np.zeros([0])]).astype(np.int64)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _list_folder(root: str):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, name))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(root, name, f))
                labels.append(c)
    return classes, files, np.asarray(labels, dtype=np.int64)


def image_folder(root: str, image_size: int = 64, channels: int = 3,
                 test_fraction: float = 0.2, split_seed: int = 0) -> Source:
    """Class-per-subfolder images: ``root/<class>/*.png|jpg``.

    If ``root/train`` and ``root/test`` exist they are the splits; otherwise a
    stratified ``test_fraction`` of each class (seeded by ``split_seed``) is
    held out. Images are decoded and resized to ``image_size`` squares.

    Raises:
      ValueError: missing folder, fewer than two classes, or no images.
    """
    if root is None or not os.path.isdir(root):
        raise ValueError(f"--data_dir={root!r} is not a folder of class subfolders.")
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        classes, tr_files, tr_labels = _list_folder(os.path.join(root, "train"))
        te_classes, te_files, te_labels = _list_folder(os.path.join(root, "test"))
        if te_classes != classes:
            raise ValueError(f"--data_dir={root!r}: train/ and test/ have different classes.")
    else:
        classes, files, labels = _list_folder(root)
        if len(classes) >= 2 and len(files):
            rng = np.random.default_rng(split_seed)
            test_mask = np.zeros(len(files), bool)
            for c in range(len(classes)):
                idx = np.flatnonzero(labels == c)
                n = int(round(test_fraction * len(idx)))
                test_mask[rng.permutation(idx)[:n]] = True
            files = np.asarray(files)
            tr_files, tr_labels = list(files[~test_mask]), labels[~test_mask]
            te_files, te_labels = list(files[test_mask]), labels[test_mask]
        else:
            tr_files, tr_labels, te_files, te_labels = files, labels, [], labels[:0]
    if len(classes) < 2:
        raise ValueError(
            f"--data_dir={root!r} has {len(classes)} class subfolder(s); an image "
            "folder needs at least 2 (one subfolder per class).")
    if not len(tr_files):
        raise ValueError(f"--data_dir={root!r} holds no images ({IMAGE_EXTENSIONS}).")

    def load(paths, labels):
        def read(path, label):
            img = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                     expand_animations=False)
            img = tf.image.resize(img, [image_size, image_size], antialias=True)
            img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
            return {"image": img, "label": label}
        return tf.data.Dataset.from_tensor_slices(
            (tf.constant(list(paths), tf.string), tf.constant(labels, tf.int64))).map(read)

    stats = IMAGENET_STATS if channels == 3 else dict(mean=(0.5,), std=(0.25,))
    return Source(
        name=f"folder:{os.path.basename(os.path.normpath(root))}",
        num_classes=len(classes), image_shape=(image_size, image_size, channels),
        train_labels=tr_labels, mean=stats["mean"], std=stats["std"],
        _train=lambda: load(tr_files, tr_labels), _test=lambda: load(te_files, te_labels),
    )


DATASETS = ("digits", "folder") + tuple(TFDS_SPECS)


def get_source(dataset: str, data_dir: Optional[str] = None,
               manual_dir: Optional[str] = None, image_size: Optional[int] = None,
               download: bool = False) -> Source:
    """The source named by ``--dataset``: ``digits`` (default, bundled),
    ``folder`` (``--data_dir`` is the image folder), or a TFDS name."""
    if dataset == "digits":
        return digits()
    if dataset == "folder":
        return image_folder(data_dir, image_size=image_size or 64)
    return tfds_source(dataset, data_dir=data_dir, manual_dir=manual_dir,
                       image_size=image_size, download=download)
