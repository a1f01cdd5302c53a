"""Streaming training data: generated in the DataLoader workers, reproducible, never repeated."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

import torch

import captcha_lit.data.streaming as streaming
from captcha_lit.data.datamodule import CaptchaDataModule
from conftest import synthetic_data

TINY_STREAM = synthetic_data(grayscale=False, num_train=64, num_val=32, num_test=32, input_size=(32, 96), batch_size=8,
                             eval_batch_size=32, gen_workers=1, train_char_weights=None)


def _dm(cache_dir, **kwargs) -> CaptchaDataModule:
    return CaptchaDataModule(**{**TINY_STREAM, "cache_dir": str(cache_dir), "streaming": True, **kwargs})


def _digests(batches) -> list[list[str]]:
    """Per batch, one digest per sample (image bytes and target)."""
    return [[hashlib.sha1(image.numpy().tobytes() + target.numpy().tobytes()).hexdigest()
             for image, target in zip(batch["image"], batch["target"])] for batch in batches]


def _epoch(dm: CaptchaDataModule, epoch: int) -> list[dict]:
    loader = dm.train_dataloader()
    loader.dataset.set_epoch(epoch)
    return list(loader)


def test_stream_batches_match_the_cached_format(cache_dir):
    dm = _dm(cache_dir)
    loader = dm.train_dataloader()
    assert len(loader) == 64 // 8  # Lightning sizes the epoch from this
    batch = next(iter(loader))
    assert set(batch) == {"image", "target", "length"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 96)
    assert batch["target"].dtype == torch.long and batch["target"].shape == (8, 5)
    assert batch["length"].tolist() == [5] * 8
    assert all(len(dm.charset.decode(row)) == 5 for row in batch["target"].tolist())


def test_stream_is_reproducible_per_worker_and_never_repeats(cache_dir):
    two_workers = _dm(cache_dir, num_workers=2)
    first = _digests(_epoch(two_workers, 0))
    assert _digests(_epoch(two_workers, 0)) == first  # the same epoch again: the same batches, in order
    # The batches depend on the epoch only, not on how many workers draw them.
    assert _digests(_epoch(_dm(cache_dir, num_workers=0), 0)) == first
    samples = [d for batch in first for d in batch]
    assert len(samples) == 64 and len(set(samples)) == 64  # no image twice within an epoch
    later = [d for batch in _digests(_epoch(two_workers, 1)) for d in batch]
    assert len(set(later)) == 64 and not set(later) & set(samples)  # a new epoch draws new images

    # Epoch 0 of the stream is the cached split, in order.
    cached = _dm(cache_dir, streaming=False)
    cached.setup("fit")
    dataset = cached.datasets["train"]
    cached_digests = _digests([{"image": torch.stack([dataset[i]["image"] for i in range(64)]),
                                "target": dataset.targets[:64]}])
    assert samples == cached_digests[0]


def test_each_worker_and_rank_draws_its_own_batches(cache_dir, monkeypatch):
    dm = _dm(cache_dir)
    dm.setup("fit")
    dataset = dm.datasets["train"]

    def drawn(worker: int, workers: int) -> list[str]:
        monkeypatch.setattr(streaming, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
        return [dm.charset.decode(sample["target"].tolist()) for sample in dataset]

    whole = drawn(0, 1)
    per_worker = [drawn(w, 2) for w in range(2)]
    assert per_worker == [drawn(w, 2) for w in range(2)]  # each worker's stream is reproducible
    assert len(per_worker[0]) == len(per_worker[1]) == 32
    # Worker w gets every other batch of 8, so together they draw the epoch exactly once.
    batches = [whole[i:i + 8] for i in range(0, 64, 8)]
    assert per_worker[0] == [t for b in batches[0::2] for t in b]
    assert per_worker[1] == [t for b in batches[1::2] for t in b]

    # DDP ranks split the epoch the same way, each with the same number of batches.
    per_rank = []
    for rank in range(2):
        dataset.set_partition(rank, 2)
        assert len(dataset) == 32
        per_rank.append(drawn(0, 1))
    assert sorted(per_rank[0] + per_rank[1]) == sorted(whole)
    dataset.set_partition(0, 1)
    with pytest.raises(ValueError, match="data.num_train=64 holds 8 whole batch"):
        dataset.set_partition(0, 16)


def test_streaming_needs_a_whole_batch(cache_dir):
    with pytest.raises(ValueError, match="data.num_train=4 .* less than one batch of data.batch_size=8"):
        _dm(cache_dir, num_train=4)


def test_streaming_training_run(make_cfg):
    from captcha_lit.train import train

    cfg = make_cfg("train", ["data.streaming=true", "data.num_workers=2", "trainer.max_epochs=2", "test=false",
                             "model.channels=[8,16,32,32]", "model.dim=32", "logger=csv"], name="stream")
    metrics = train(cfg)
    assert metrics["epochs"] == 2
    assert metrics["global_step"] == 2 * (64 // 16)
    assert [p["epoch"] for p in metrics["timeline"]] == [0, 1]
