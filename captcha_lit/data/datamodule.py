"""The LightningDataModule for generated CAPTCHAs.

``prepare_data`` (once per node) generates each split in parallel and caches it
on disk; ``setup`` (every process) memory-maps the cached arrays. The train, val
and test splits are drawn from disjoint seed streams, and the test split uses its
own fixed seed, so every run and every sweep job is scored on the same images.
With ``streaming=True`` the train split is not stored: the DataLoader workers
generate it on the fly, new images every epoch (``captcha_lit.data.streaming``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, default_collate

from captcha_lit.charset import Charset
from captcha_lit.data import cache
from captcha_lit.data.streaming import StreamingCaptchaDataset
from captcha_lit.data.synthetic import GeneratorSpec, generate, resolve_fonts
from captcha_lit.data.transforms import TrainPreset, to_chw_uint8

log = logging.getLogger(__name__)


class CaptchaArrayDataset(Dataset):
    """(N, H, W, C) uint8 images with text labels -> dicts of a (C, H, W) uint8 image,
    the padded target indices, the length and the text."""

    def __init__(self, images: np.ndarray, texts: Sequence[str], charset: Charset, max_length: int, transform=None):
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} labels")
        self.images = images
        self.texts = list(texts)
        self.targets = torch.tensor(charset.encode_batch(self.texts, max_length), dtype=torch.long).reshape(
            len(self.texts), max_length
        )
        self.lengths = torch.tensor([len(t) for t in self.texts], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        image = to_chw_uint8(torch.from_numpy(np.array(self.images[index])))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "target": self.targets[index], "length": self.lengths[index]}

    def __getitems__(self, indices: Sequence[int]) -> dict | list[dict]:
        """A whole batch at once (the DataLoader asks for it this way): one indexing of the image
        array instead of one per sample, the same tensors as collating ``self[i]`` for each index
        (without ``text``).
        With a per-sample transform, the samples one by one."""
        if self.transform is not None:
            return [self[i] for i in indices]
        index = np.asarray(indices, dtype=np.int64)
        images = to_chw_uint8(torch.from_numpy(self.images[index]))  # fancy indexing copies, also from a memmap
        rows = torch.from_numpy(index)
        # No text list: Lightning walks every element of a batch, and 64 strings cost a training step
        # about 2 ms; the targets hold the same labels (``callbacks._texts`` decodes them).
        return {"image": images, "target": self.targets[rows], "length": self.lengths[rows]}


def collate(batch):
    """``default_collate``, except for a batch ``CaptchaArrayDataset.__getitems__`` already built."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def check_input_size(input_size: Sequence[int]) -> None:
    if len(input_size) != 2 or min(input_size) < 8:
        raise ValueError(f"data.input_size={list(input_size)} must be [height, width], each at least 8")


class ArrayLoaders:
    """DataLoaders over ``self.datasets[split]``, shared by the synthetic and folder datamodules."""

    datasets: dict

    def _init_loaders(self, batch_size: int, eval_batch_size: int, num_workers: int, augmentation: dict | None) -> None:
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        augmentation = dict(augmentation or {})
        # The batch backend augments inside the LightningModule; only torchvision's runs here.
        backend = augmentation.pop("backend", "batch")
        self.train_transform = TrainPreset(**augmentation) if backend == "torchvision" else None
        self.datasets: dict[str, CaptchaArrayDataset] = {}

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        dataset = self.datasets[split]
        # Workers are not persistent: each epoch starts them afresh from the global RNG, as a resumed
        # run does, so a run resumed from a checkpoint continues exactly like one never stopped.
        if isinstance(dataset, IterableDataset):  # a stream shards itself over DDP ranks and workers
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                dataset.set_partition(trainer.global_rank, trainer.world_size)
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=False)
        samples = getattr(self, "samples_per_epoch", None) if train else None
        # More samples than images: an epoch is several shuffled passes (torch draws whole permutations).
        sampler = RandomSampler(dataset, num_samples=int(samples)) if samples and samples > len(dataset) else None
        return DataLoader(
            dataset, batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None, sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size, num_workers=self.num_workers, pin_memory=False,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def _char_weights(charset: Charset, weights: dict | None) -> tuple[float, ...] | None:
    """``{char: weight}`` (unlisted characters weigh 1) -> one weight per charset character."""
    if not weights:
        return None
    weights = {str(k): float(v) for k, v in dict(weights).items()}
    bad = {c: w for c, w in weights.items() if not w >= 0}
    if bad:
        raise ValueError(f"data.train_char_weights must be non-negative, got {bad}")
    # The default weights name O and 0; a charset without them (digits, lowercase) just skips them.
    unknown = [c for c in weights if c not in charset.chars]
    if unknown:
        log.info("data.train_char_weights: %s not in charset %r, skipped", unknown, charset.chars)
    if all(weights.get(c, 1.0) == 1.0 for c in charset.chars):
        return None  # uniform: the same data (and cache) as no weights
    if not any(weights.get(c, 1.0) > 0 for c in charset.chars):
        raise ValueError(f"data.train_char_weights gives every character of {charset.chars!r} weight 0")
    return tuple(weights.get(c, 1.0) for c in charset.chars)


class CaptchaDataModule(ArrayLoaders, L.LightningDataModule):
    def __init__(
        self,
        *,
        charset: str,
        min_length: int,
        max_length: int,
        input_size: Sequence[int],
        grayscale: bool,
        num_train: int,
        num_val: int,
        num_test: int,
        seed: int,
        test_seed: int,
        cache_dir: str,
        batch_size: int,
        eval_batch_size: int,
        # The canvas of the captcha package's own ImageCaptcha.
        width: int = 160,
        height: int = 60,
        fonts: Sequence[str] | str | None = None,
        font_sizes: Sequence[int] | None = None,
        train_char_weights: dict | None = None,
        gen_workers: int | None = None,
        num_workers: int = 0,
        streaming: bool = False,
        augmentation: dict | None = None,
    ):
        """The values without a default are the recipe's: conf/data/synthetic.yaml holds them."""
        super().__init__()
        # Plain values only, so the checkpoint records the data config and loads with weights_only.
        self.save_hyperparameters()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if int(value) < 1:
                raise ValueError(f"data.{name}={value} must be at least 1")
        check_input_size(input_size)
        self.charset = Charset(charset)
        self.spec = GeneratorSpec(
            charset=self.charset.chars, min_length=int(min_length), max_length=int(max_length),
            width=int(width), height=int(height), input_size=(int(input_size[0]), int(input_size[1])),
            channels=1 if grayscale else 3, fonts=tuple(resolve_fonts(fonts)) if resolve_fonts(fonts) else None,
            font_sizes=tuple(int(s) for s in font_sizes) if font_sizes else None,
        )
        self.split_specs = {"train": replace(self.spec, char_weights=_char_weights(self.charset, train_char_weights)),
                            "val": self.spec, "test": self.spec}
        self.max_length = int(max_length)
        self.splits = {"train": (int(num_train), seed), "val": (int(num_val), seed), "test": (int(num_test), test_seed)}
        self.streaming = bool(streaming)
        self._stream_epoch = 0  # the first epoch of a stream (a resumed run's, from its checkpoint)
        if self.streaming and int(num_train) < batch_size:
            raise ValueError(f"data.num_train={num_train} (samples per epoch when streaming) is less than one "
                             f"batch of data.batch_size={batch_size}; raise num_train")
        self.cache_dir = cache_dir
        self.gen_workers = gen_workers
        self._init_loaders(batch_size, eval_batch_size, num_workers, augmentation)

    def _split(self, split: str) -> tuple[list[str], np.ndarray]:
        count, seed = self.splits[split]
        spec = self.split_specs[split]
        fields = {**spec.key_fields(), "split": split, "seed": seed}
        height, width = self.spec.input_size

        def build(out: np.ndarray) -> list[str]:
            log.info("generating %d %s images (seed %s) into the cache", count, split, seed)
            texts, _ = generate(spec, seed, split, count, workers=self.gen_workers, out=out, progress=True)
            return texts

        return cache.get_or_build(self.cache_dir, f"synthetic-{split}", fields, count, build,
                                  (height, width, spec.channels))

    def label_spec(self) -> dict:
        """The charset and length range the model must be built for."""
        return {"charset": self.charset.chars, "min_length": self.spec.min_length, "max_length": self.max_length}

    def state_dict(self) -> dict:
        """In checkpoints: the epoch a resumed stream continues with. Lightning starts the first resumed
        epoch's workers before any epoch hook runs, so the stream must know it from here."""
        trainer = getattr(self, "trainer", None)
        if not self.streaming or trainer is None:
            return {}
        finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # saved at the end of the epoch
        return {"stream_epoch": trainer.current_epoch + int(finished)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._stream_epoch = int(state_dict.get("stream_epoch", 0))
        if isinstance(self.datasets.get("train"), StreamingCaptchaDataset):
            self.datasets["train"].set_epoch(self._stream_epoch)

    def prepare_data(self) -> None:
        # Only the splits that the trainer's stage reads: testing a checkpoint must not first generate
        # the 140,000 training images.
        trainer = getattr(self, "trainer", None)
        stage = str(trainer.state.fn.value) if trainer is not None and trainer.state.fn is not None else None
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, tuple(self.splits)):
            if not (split == "train" and self.streaming):
                self._split(split)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, tuple(self.splits)) if stage else tuple(self.splits):
            if split in self.datasets:
                continue
            transform = self.train_transform if split == "train" else None
            if split == "train" and self.streaming:
                count, seed = self.splits["train"]
                self.datasets[split] = StreamingCaptchaDataset(self.split_specs["train"], seed, count, self.batch_size,
                                                               self.charset, self.max_length, transform)
                self.datasets[split].set_epoch(self._stream_epoch)
            else:
                texts, images = self._split(split)
                self.datasets[split] = CaptchaArrayDataset(images, texts, self.charset, self.max_length, transform)
