import numpy as np
import pytest
import torch

from captcha_lit.charset import Charset
from captcha_lit.data.datamodule import CaptchaDataModule
from conftest import synthetic_data

TINY = synthetic_data(grayscale=False, num_train=48, num_val=24, num_test=20, input_size=(32, 96), batch_size=16,
                      eval_batch_size=8, gen_workers=1, train_char_weights=None)


def _dm(cache_dir, **kwargs) -> CaptchaDataModule:
    return CaptchaDataModule(**{**TINY, "cache_dir": str(cache_dir), **kwargs})


def test_train_batch_shapes_and_types(cache_dir):
    dm = _dm(cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    image, target, length = batch["image"], batch["target"], batch["length"]
    assert image.dtype == torch.uint8
    assert image.shape == (16, 3, 32, 96)
    assert target.dtype == torch.long and target.shape == (16, 5)
    assert length.dtype == torch.long and length.tolist() == [5] * 16
    assert set(batch) == {"image", "target", "length"}  # no text list: the targets hold the labels
    cs = Charset("0-9A-Z")
    texts = set(dm.datasets["train"].texts)
    assert all(cs.decode(row) in texts for row in target.tolist())  # targets encode exactly the label texts
    assert image.float().std() > 5  # real pixels


def test_split_sizes_and_eval_batches(cache_dir):
    dm = _dm(cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 48
    assert len(dm.datasets["val"]) == 24
    assert len(dm.datasets["test"]) == 20
    # train drops the ragged last batch; eval loaders keep every image, in order
    assert len(dm.train_dataloader()) == 3
    assert sum(b["image"].shape[0] for b in dm.val_dataloader()) == 24
    test_batches = list(dm.test_dataloader())
    assert [b["image"].shape[0] for b in test_batches] == [8, 8, 4]
    texts = [dm.charset.decode(row) for b in test_batches for row in b["target"].tolist()]
    assert texts == dm.datasets["test"].texts


def test_dataloaders_work_without_explicit_setup(cache_dir):
    dm = _dm(cache_dir)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 96)


def test_input_size_is_respected(cache_dir):
    dm = _dm(cache_dir, input_size=(24, 64), num_train=16, num_val=8, num_test=8, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 64)


def test_variable_length_targets_are_padded(cache_dir):
    dm = _dm(cache_dir, charset="0-9", min_length=3, max_length=6, num_train=32, num_val=8, num_test=8,
             batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (32, 6)
    lengths = batch["length"].tolist()
    assert set(lengths) <= {3, 4, 5, 6} and len(set(lengths)) > 1
    for row, n in zip(batch["target"].tolist(), lengths):
        assert all(v >= 0 for v in row[:n]) and all(v == -1 for v in row[n:])


def test_test_split_is_independent_of_data_seed(cache_dir):
    a, b = _dm(cache_dir, seed=0), _dm(cache_dir, seed=1)
    for dm in (a, b):
        dm.setup(None)
    test_a, test_b = a.datasets["test"], b.datasets["test"]
    assert test_a.texts == test_b.texts
    assert np.array_equal(np.asarray(test_a.images), np.asarray(test_b.images))
    # ... while train and val follow data.seed
    assert a.datasets["train"].texts != b.datasets["train"].texts
    assert not np.array_equal(np.asarray(a.datasets["train"].images), np.asarray(b.datasets["train"].images))
    assert a.datasets["val"].texts != b.datasets["val"].texts


def test_splits_are_disjoint_streams(cache_dir):
    dm = _dm(cache_dir)
    dm.setup(None)
    train = np.asarray(dm.datasets["train"].images)
    val = np.asarray(dm.datasets["val"].images)
    assert not np.array_equal(train[: len(val)], val)
    assert dm.datasets["train"].texts[:5] != dm.datasets["val"].texts[:5]


def test_same_config_is_reproducible(cache_dir, tmp_path):
    # A fresh cache folder regenerates byte-identical data.
    a = _dm(cache_dir, num_train=16, num_val=8, num_test=8)
    b = _dm(tmp_path / "other_cache", num_train=16, num_val=8, num_test=8)
    a.setup(None)
    b.setup(None)
    for split in ("train", "val", "test"):
        assert a.datasets[split].texts == b.datasets[split].texts
        assert np.array_equal(np.asarray(a.datasets[split].images), np.asarray(b.datasets[split].images))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_train": 0}, "num_train=0"),
        ({"batch_size": 0}, "batch_size"),
        ({"input_size": (4, 96)}, "input_size"),
        ({"input_size": (32,)}, "input_size"),
        ({"charset": "AAB"}, "duplicate"),
        ({"min_length": 0}, "at least 1"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_config_raises_clear_error(cache_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dm(cache_dir, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "data.batch_size=0"),
    ({"num_workers": -1}, "data.num_workers=-1"),
    ({"input_size": (4, 96)}, r"data.input_size=\[4, 96\]"),
])
def test_bad_loader_settings_are_named(tmp_path, kwargs, match):
    from captcha_lit.data.datamodule import CaptchaDataModule
    from captcha_lit.data.folder import FolderDataModule

    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match=match):
        CaptchaDataModule(**synthetic_data(cache_dir=str(tmp_path), **kwargs))
    with pytest.raises(ValueError, match=match):
        FolderDataModule(path=str(tmp_path / "imgs"), cache_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("grayscale", [False, True])
def test_batched_fetch_equals_collating_samples(cache_dir, grayscale):
    # The loaders fetch a whole batch with one indexing of the image array (__getitems__); it must
    # give exactly what collating the samples one by one gave.
    from torch.utils.data import default_collate

    from captcha_lit.data.datamodule import collate

    dm = _dm(cache_dir, grayscale=grayscale)
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.datasets["train"]
    indices = [7, 0, 31, 7, 12]
    batch = dataset.__getitems__(indices)
    expected = default_collate([dataset[i] for i in indices])
    assert batch.keys() == expected.keys()
    for key in ("image", "target", "length"):
        assert batch[key].dtype == expected[key].dtype
        assert torch.equal(batch[key], expected[key]), key
    assert batch["image"].shape == (5, 1 if grayscale else 3, 32, 96)
    assert [dm.charset.decode(row) for row in batch["target"].tolist()] == [dataset.texts[i] for i in indices]
    assert collate(batch) is batch
    # A loader over a Subset (as visualize builds) goes through the same path.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=5, collate_fn=collate)
    assert torch.equal(next(iter(loader))["image"], expected["image"])


def test_batched_fetch_with_a_per_sample_transform_returns_samples(cache_dir):
    from captcha_lit.data.datamodule import CaptchaArrayDataset, collate

    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 96, 3), dtype=np.uint8)
    calls = []

    def transform(image):
        calls.append(image.shape)
        return image.flip(-1)

    dataset = CaptchaArrayDataset(images, ["AB", "CD", "EF", "GH"], Charset("A-Z"), 2, transform=transform)
    samples = dataset.__getitems__([2, 1])
    assert isinstance(samples, list) and len(calls) == 2
    batch = collate(samples)
    assert [Charset("A-Z").decode(row) for row in batch["target"].tolist()] == ["EF", "CD"]
    assert torch.equal(batch["image"][0], torch.from_numpy(images[2]).permute(2, 0, 1).flip(-1))
