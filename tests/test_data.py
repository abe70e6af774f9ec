"""Data sources, SSL splits and the multi-view pipeline."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfssl import augment, data
from tfssl.data import sources


@pytest.fixture(scope="module")
def digits():
    return data.digits()


def test_digits_is_the_bundled_dataset_with_a_fixed_stratified_test_split(digits):
    assert digits.num_train == 1300 and digits.image_shape == (8, 8, 1)
    test = list(digits.test().as_numpy_iterator())
    assert len(test) == 497
    test_labels = np.array([e["label"] for e in test])
    # Stratified: every class holds 27.6% of its images out, give or take one.
    full = np.bincount(np.concatenate([digits.train_labels, test_labels]), minlength=10)
    np.testing.assert_allclose(np.bincount(test_labels, minlength=10), full * 497 / 1797, atol=1)
    # Fixed: a second load gives the same split.
    np.testing.assert_array_equal(data.digits().train_labels, digits.train_labels)
    first = next(iter(digits.train()))
    assert first["image"].dtype == tf.uint8 and int(first["index"]) == 0
    assert max(int(e["image"].max()) for e in test[:50]) == 255


def test_labeled_split_is_deterministic_and_class_balanced(digits):
    a = data.labeled_split(digits.train_labels, 10, labels_per_class=4, seed=3)
    b = data.labeled_split(digits.train_labels, 10, labels_per_class=4, seed=3)
    c = data.labeled_split(digits.train_labels, 10, labels_per_class=4, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.bincount(digits.train_labels[a], minlength=10), [4] * 10)
    f = data.labeled_split(digits.train_labels, 10, label_fraction=0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(digits.train_labels[f], minlength=10), [13] * 10)


def test_labeled_split_refuses_more_labels_than_a_class_has():
    labels = np.array([0] * 5 + [1] * 3 + [-1] * 4)
    with pytest.raises(ValueError, match=r"--labels_per_class=4 is more than class 1 has \(3"):
        data.labeled_split(labels, 2, labels_per_class=4)
    assert -1 not in labels[data.labeled_split(labels, 2, labels_per_class=3)]
    with pytest.raises(ValueError, match="exactly one"):
        data.labeled_split(labels, 2)


def test_unlabeled_ids_include_labeled_unless_told_not_to():
    lab = np.array([1, 3])
    np.testing.assert_array_equal(data.unlabeled_ids(5, lab), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(data.unlabeled_ids(5, lab, include_labeled=False), [0, 2, 4])
    np.testing.assert_array_equal(data.unlabeled_ids(3, lab[:1], num_extra=2), [0, 1, 2, 3, 4])


def test_labeled_ids_are_written_for_audit(tmp_path, digits):
    ids = data.labeled_split(digits.train_labels, 10, labels_per_class=2, seed=0)
    path = data.write_labeled_ids(str(tmp_path), ids, digits.train_labels, seed=0)
    saved = json.load(open(path))
    assert saved["indices"] == ids.tolist()
    assert saved["labels"] == digits.train_labels[ids].tolist()


def test_semi_supervised_stream_structure_and_indices(digits):
    ids = data.labeled_split(digits.train_labels, 10, labels_per_class=2, seed=0)
    weak = augment.weak(8, 1, flip=False, pad=1)
    ds = data.semi_supervised(digits, ids, {"weak": weak}, 8,
                              {"weak": weak, "strong": augment.strong(8, 1, flip=False, pad=1)},
                              16, seed=0)
    batch = next(iter(ds))
    assert set(batch) == {"labeled", "unlabeled"}
    assert batch["labeled"]["weak"].shape == (8, 8, 8, 1)
    assert batch["unlabeled"]["strong"].shape == (16, 8, 8, 1)
    assert set(batch["labeled"]["index"].numpy()) <= set(ids.tolist())
    # The labeled images are the ones with those dataset indices, with their labels.
    np.testing.assert_array_equal(batch["labeled"]["label"].numpy(),
                                  digits.train_labels[batch["labeled"]["index"].numpy()])
    np.testing.assert_array_equal(batch["unlabeled"]["label"].numpy(),
                                  digits.train_labels[batch["unlabeled"]["index"].numpy()])
    # Same seed, same order.
    again = next(iter(data.semi_supervised(digits, ids, {"weak": weak}, 8, {"weak": weak}, 16,
                                           seed=0)))
    np.testing.assert_array_equal(again["unlabeled"]["index"], batch["unlabeled"]["index"])


def test_unlabeled_stream_can_exclude_the_labeled_images(digits):
    ids = data.labeled_split(digits.train_labels, 10, labels_per_class=20, seed=0)
    weak = augment.identity(8)
    ds = data.semi_supervised(digits, ids, {"weak": weak}, 10, {"weak": weak}, 100,
                              include_labeled_in_unlabeled=False, seed=0)
    seen = np.concatenate([b["unlabeled"]["index"].numpy() for b in ds.take(20)])
    assert not set(seen.tolist()) & set(ids.tolist())
    assert len(set(seen.tolist())) > 900


def _write_folder(root, classes=("cat", "dog"), per_class=5, size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 255, [size, size + i, 3], dtype=np.uint8)
            tf.io.write_file(os.path.join(root, c, f"{i}.png"), tf.io.encode_png(img))


def test_image_folder_source(tmp_path):
    _write_folder(str(tmp_path), per_class=5)
    src = data.image_folder(str(tmp_path), image_size=16, test_fraction=0.2)
    assert src.num_classes == 2 and src.image_shape == (16, 16, 3)
    assert src.num_train == 8
    test = list(src.test().as_numpy_iterator())
    assert len(test) == 2 and sorted(e["label"] for e in test) == [0, 1]
    e = next(iter(src.train()))
    assert e["image"].shape == (16, 16, 3) and e["image"].dtype == tf.uint8


def test_image_folder_refuses_one_class_and_missing_dirs(tmp_path):
    _write_folder(str(tmp_path), classes=("only",))
    with pytest.raises(ValueError, match="1 class subfolder"):
        data.image_folder(str(tmp_path))
    with pytest.raises(ValueError, match="--data_dir"):
        data.image_folder(str(tmp_path / "nope"))


@pytest.mark.parametrize("name,size,classes", [("cifar10", 32, 10), ("cifar100", 32, 100),
                                               ("svhn_cropped", 32, 10),
                                               ("imagenet2012", 224, 1000)])
def test_tfds_sources_with_mock_data(name, size, classes):
    with tfds.testing.mock_data(num_examples=12):
        src = sources.tfds_source(name)
        assert src.num_classes == classes and src.image_shape == (size, size, 3)
        assert src.num_train == 12 and len(src.train_labels) == 12
        elems = list(src.train().as_numpy_iterator())
        assert [int(e["index"]) for e in elems] == list(range(12))
        np.testing.assert_array_equal([e["label"] for e in elems], src.train_labels)
        assert src.extra_unlabeled() is None


def test_stl10_unlabelled_split_follows_the_train_indices():
    with tfds.testing.mock_data(num_examples=6):
        src = sources.tfds_source("stl10")
        assert src.num_extra_unlabeled == 6
        extra = list(src.extra_unlabeled().as_numpy_iterator())
        assert [int(e["index"]) for e in extra] == list(range(6, 12))
        assert all(int(e["label"]) == -1 for e in extra)
        ids = data.labeled_split(src.train_labels, 10, labels_per_class=1, seed=0) \
            if min(np.bincount(src.train_labels, minlength=10)) > 0 else np.array([0])
        ds = data.semi_supervised(src, ids, {"w": augment.identity(96)}, 2,
                                  {"w": augment.identity(96)}, 4, seed=0)
        seen = np.concatenate([b["unlabeled"]["index"].numpy() for b in ds.take(6)])
        assert seen.max() >= 6  # the unlabelled split is in the unlabeled stream


def test_tfds_not_prepared_or_unknown_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not prepared.*tfds build cifar10"):
        sources.tfds_source("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--dataset='no_such_set' is unknown"):
        sources.tfds_source("no_such_set", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--data_dir="):
        sources.tfds_source("cifar10", data_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize("workers,replicas_per_worker", [(2, 1), (2, 2)])
def test_worker_slices_rebuild_the_global_batches(digits, workers, replicas_per_worker):
    # Multi-worker input (distribute_datasets_from_function): each worker's
    # per-replica batches, in replica order, are the rows of the global batch
    # one process draws (labeled, unlabeled and PAWS support streams).
    ids = data.labeled_split(digits.train_labels, 10, labels_per_class=4, seed=0)
    weak = {"weak": augment.weak(8, 1, flip=False, pad=1)}
    replicas = workers * replicas_per_worker
    support = dict(classes_per_batch=4, imgs_per_class=4, num_chunks=1, replacement=False)

    def stream(ctx=None, sup=None):
        return data.semi_supervised(digits, ids, weak, 16, weak, 8, seed=3, input_context=ctx,
                                    support=sup)

    for sup in (None, support):
        whole = [b for b in stream(sup=sup).take(3)]
        parts = []
        for w in range(workers):
            ctx = tf.distribute.InputContext(workers, w, replicas)
            part = stream(ctx, sup)
            # infinite, as the whole stream (else tf.distribute syncs every step)
            assert part.cardinality() == tf.data.INFINITE_CARDINALITY
            parts.append([b for b in part.take(3 * replicas_per_worker)])
        for g in range(3):
            for key, rows in (("labeled", 16), ("unlabeled", 8)):
                got = np.concatenate([parts[w][g * replicas_per_worker + r][key]["index"]
                                      for w in range(workers)
                                      for r in range(replicas_per_worker)])
                assert parts[0][0][key]["weak"].shape[0] == rows // replicas
                np.testing.assert_array_equal(got, whole[g][key]["index"].numpy())
    with pytest.raises(ValueError, match="does not split over 3 replicas"):
        stream(tf.distribute.InputContext(1, 0, 3))
