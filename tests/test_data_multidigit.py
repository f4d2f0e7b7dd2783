"""MREF / MDIST / MBG multi-digit data: content, determinism, splits, variants."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from arnn_plugins.data import (
    COLOUR_RGB,
    COLOURS,
    DigitSet,
    MultiDigitDataset,
    load_digits,
    make_multidigit,
)
from arnn_plugins.data.digits import MNIST_ROOT_ENV


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    # A user's MNIST folder must not change what these tests see.
    monkeypatch.delenv(MNIST_ROOT_ENV, raising=False)


def _outside_boxes(s):
    free = np.ones(s.mask.shape, dtype=bool)
    for y0, x0, y1, x1 in s.boxes:
        free[y0:y1, x0:x1] = False
    return free


def test_shipped_digits_are_real_mnist():
    train = load_digits("train")
    assert train.images.shape == (50_000, 28, 28) and train.images.dtype == np.uint8
    # The first MNIST training labels, as published.
    assert train.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert train.images.max() == 255 and train.images[:, 0, 0].max() == 0  # white on black
    assert len(load_digits("val")) == 10_000 and len(load_digits("test")) == 10_000


def test_item_shapes_types_and_collate():
    ds = MultiDigitDataset("mref", "train", 6, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 100, 100) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (100, 100) and item["mask"].dtype == torch.bool and item["mask"].any()
    assert 0 <= item["query"] < 10 and 0 <= item["answer"] < 5
    assert 0.5 <= item["scale"] <= 3.0
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 100, 100) and batch["query"].dtype == torch.int64
    assert batch["mask"].shape == (3, 100, 100)
    img, q, a, m = MultiDigitDataset("mref", "train", 2, seed=0, return_tuple=True)[0]
    assert torch.equal(img, item["image"]) and (q, a) == (item["query"], item["answer"])


def test_five_to_nine_distinct_digits_without_overlap():
    ds = MultiDigitDataset("mref", "train", 40, seed=3)
    counts = set()
    for i in range(len(ds)):
        s = ds.sample(i)
        n = len(s.classes)
        counts.add(n)
        assert 5 <= n <= 9
        assert len(set(s.classes.tolist())) == n  # distinct classes
        assert s.query == s.classes[s.target]
        assert np.all((s.scales >= 0.5 - 1e-9) & (s.scales <= 3.0 + 1e-9))
        occ = np.zeros((100, 100), dtype=int)
        for y0, x0, y1, x1 in s.boxes:
            assert 0 <= y0 < y1 <= 100 and 0 <= x0 < x1 <= 100
            occ[y0:y1, x0:x1] += 1
        assert occ.max() == 1  # ink boxes never overlap
        y0, x0, y1, x1 = s.boxes[s.target]
        inside = np.zeros_like(s.mask)
        inside[y0:y1, x0:x1] = True
        assert s.mask.any() and not (s.mask & ~inside).any()
    assert len(counts) >= 3  # the count varies


def test_answer_is_the_colour_under_the_target_mask():
    ds = MultiDigitDataset("mref", "val", 30, seed=1)
    answers = set()
    for i in range(len(ds)):
        s = ds.sample(i)
        pix = s.image[:, s.mask].T  # (k, 3): colour * digit intensity
        direction = pix.mean(0) / pix.mean(0).max()
        nearest = int(np.argmin(((COLOUR_RGB - direction) ** 2).sum(1)))
        assert nearest == s.answer, (i, direction, COLOURS[s.answer])
        np.testing.assert_allclose(direction, COLOUR_RGB[s.answer], atol=1e-5)
        answers.add(s.answer)
    assert len(answers) >= 4


def test_mdist_is_noisier_than_mref_with_the_same_layout():
    ref = MultiDigitDataset("mref", "train", 5, seed=7)
    dist = MultiDigitDataset("mdist", "train", 5, seed=7)
    for i in range(5):
        a, b = ref.sample(i), dist.sample(i)
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.mask, b.mask) and a.answer == b.answer
        free = _outside_boxes(a)
        assert a.image[:, free].std() == 0.0 and a.image[:, free].max() == 0.0  # black
        assert b.image[:, free].std() > 0.1
        assert b.image.std() > a.image.std() * 0.9
    # Different items get different noise.
    assert not np.array_equal(dist.sample(0).image[:, :10, :10], dist.sample(1).image[:, :10, :10])


def test_mbg_background_is_a_photograph():
    ds = MultiDigitDataset("mbg", "train", 6, seed=0)
    means = []
    for i in range(6):
        s = ds.sample(i)
        bg = s.image[:, _outside_boxes(s)].T
        assert bg.mean() > 0.05 and bg.std() > 0.02
        means.append(bg.mean(0))
    assert np.ptp(np.array(means), axis=0).max() > 0.02  # not one constant background


def test_same_seed_repeats_different_seed_differs():
    a = MultiDigitDataset("mbg", "train", 10, seed=11)
    b = MultiDigitDataset("mbg", "train", 10, seed=11)
    c = MultiDigitDataset("mbg", "train", 10, seed=12)
    # Access order must not matter.
    late = [b[i] for i in (9, 3, 0)]
    for i, item in zip((9, 3, 0), late):
        ref = a[i]
        assert torch.equal(ref["image"], item["image"]) and torch.equal(ref["mask"], item["mask"])
        assert (ref["query"], ref["answer"]) == (item["query"], item["answer"])
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_splits_use_disjoint_digit_images():
    ids = {}
    for split in ("train", "val", "test"):
        ds = MultiDigitDataset("mref", split, 25, seed=0)
        ids[split] = set(np.concatenate([ds.sample(i).digit_ids for i in range(len(ds))]).tolist())
        allowed = set(load_digits(split).ids.tolist())
        assert ids[split] <= allowed
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert max(ids["train"]) < 50_000 <= min(ids["val"]) and max(ids["val"]) < 60_000 <= min(ids["test"])


def test_224_variant():
    ds = MultiDigitDataset("mbg", "test", 2, size=224, seed=0)
    item = ds[1]
    assert item["image"].shape == (3, 224, 224) and item["mask"].shape == (224, 224)
    s = ds.sample(1)
    # Digit sizes scale with the image: boxes are larger than at 100 px on average.
    small = MultiDigitDataset("mbg", "test", 2, size=100, seed=0).sample(1)
    assert np.array_equal(s.classes, small.classes)
    area = lambda b: ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean()
    assert area(s.boxes) > 3 * area(small.boxes)


def test_inverse_task_answers_the_digit_of_the_queried_colour():
    ds = MultiDigitDataset("mref", "train", 30, task="digit", seed=2)
    assert ds.num_queries == 5 and ds.num_answers == 10
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.answer == s.classes[s.target] and s.query == s.colours[s.target]
        assert (s.colours == s.query).sum() == 1  # the queried colour is unique
        pix = s.image[:, s.mask].mean(1)
        np.testing.assert_allclose(pix / pix.max(), COLOUR_RGB[s.query], atol=1e-5)


def test_make_multidigit_stacks_items():
    out = make_multidigit("mdist", 4, seed=5, size=48)
    ds = out["dataset"]
    assert out["image"].shape == (4, 3, 48, 48) and out["mask"].shape == (4, 48, 48)
    assert torch.equal(out["image"][2], ds[2]["image"]) and out["answer"][2].item() == ds[2]["answer"]


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x08 << 8) | arr.ndim
    header = np.array([magic, *arr.shape], dtype=">i4").tobytes()
    path.write_bytes(header + arr.tobytes())


def test_torchvision_mnist_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_lab = np.arange(120) % 10
    test_lab = np.arange(30) % 10
    train_img = np.zeros((120, 28, 28), np.uint8)
    train_img[:, 6:22, 10:18] = 255  # a bar, so every image has ink
    test_img = rng.integers(0, 256, (30, 28, 28)).astype(np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train_img)
    _write_idx(raw / "train-labels-idx1-ubyte", train_lab)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_img)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_lab)

    tr = load_digits("train", root=str(tmp_path))
    va = load_digits("val", root=str(tmp_path))
    te = load_digits("test", root=str(tmp_path))
    assert tr.source.startswith("torchvision") and len(tr) == 100 and len(va) == 20 and len(te) == 30
    assert np.array_equal(tr.images, train_img[:100]) and np.array_equal(te.labels, test_lab)
    assert not set(tr.ids) & set(va.ids) and min(te.ids) >= 60_000
    ds = MultiDigitDataset("mref", "val", 3, mnist_root=str(tmp_path), seed=0)
    assert set(np.concatenate([ds.sample(i).digit_ids for i in range(3)])) <= set(va.ids.tolist())
    with pytest.raises(FileNotFoundError, match="MNIST"):
        load_digits("train", root=str(tmp_path / "nowhere"))


def test_custom_digit_set_and_bad_input():
    img = np.zeros((10, 28, 28), np.uint8)
    img[:, 8:20, 12:16] = 200
    digits = DigitSet(img, np.arange(10), np.arange(10) + 1000, "hand-made")
    ds = MultiDigitDataset("mref", "train", 3, digits=digits, num_digits=(5, 5), seed=0)
    assert set(ds.sample(0).digit_ids.tolist()) <= set(range(1000, 1010)) and len(ds.sample(0).classes) == 5
    with pytest.raises(ValueError, match="MultiDigitDataset: variant"):
        MultiDigitDataset("mnist", "train", 1, digits=digits)
    with pytest.raises(ValueError, match="do not fit"):
        MultiDigitDataset("mref", "train", 1, digits=digits, scale_range=(0.5, 5.0), scale_with_size=False)
    with pytest.raises(ValueError, match="DigitSet"):
        DigitSet(img[:, :, :, None], np.arange(10), np.arange(10), "bad")
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="classes"):
        MultiDigitDataset("mref", "train", 1, digits=DigitSet(img, np.zeros(10, np.int64), np.arange(10), "one"))
