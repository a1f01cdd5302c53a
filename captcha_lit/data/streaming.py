"""An unbounded stream of generated training CAPTCHAs, drawn in the DataLoader workers.

``data.streaming=true`` trains on fresh images every epoch and stores none of them.
Sample ``i`` of the stream is the image that ``(seed, "train", i)`` determines, the same
one the cached train split holds at index ``i``, so epoch 0 of a stream is the cached
split (in order) and each later epoch continues with new indices.

Epoch ``e`` is the index range ``[e * num_train, (e + 1) * num_train)``, cut into whole
batches. Batch ``b`` of an epoch belongs to DDP rank ``b % world_size`` and, within a
rank, to DataLoader worker ``(b // world_size) % num_workers``. So every worker draws
its own disjoint indices, every image is drawn once, and the batches depend only on the
seed and the epoch: not on the number of workers, on which worker runs first, or on
whether the run was resumed.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import IterableDataset, get_worker_info

from captcha_lit.charset import Charset
from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec
from captcha_lit.data.transforms import to_chw_uint8

# Lightning warns that an IterableDataset's length may be wrong with several workers unless each
# worker draws its own part of the data; this dataset does, and its length is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


class StreamingCaptchaDataset(IterableDataset):
    """Yields the same dicts as ``CaptchaArrayDataset`` (uint8 (3, H, W) image, padded target,
    length, text), ``batch_size`` samples per batch, whole batches only."""

    def __init__(self, spec: GeneratorSpec, seed: int, samples_per_epoch: int, batch_size: int, charset: Charset,
                 max_length: int, transform=None):
        super().__init__()
        self.spec = spec
        self.seed = seed
        self.samples_per_epoch = int(samples_per_epoch)
        self.batch_size = int(batch_size)
        self.charset = charset
        self.max_length = int(max_length)
        self.transform = transform
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        self._generator: CaptchaGenerator | None = None
        self.set_partition(0, 1)

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of each training epoch (by the LightningModule), before the
        workers start: they receive a copy of the dataset with this epoch."""
        self.epoch = int(epoch)

    def set_partition(self, rank: int, world_size: int) -> None:
        """This process's share of each epoch under DDP: every rank gets the same number of batches."""
        batches = self.samples_per_epoch // self.batch_size
        if batches < world_size:
            raise ValueError(
                f"data.num_train={self.samples_per_epoch} holds {batches} whole batch(es) of "
                f"data.batch_size={self.batch_size}, fewer than the {world_size} training process(es); "
                "raise data.num_train or lower data.batch_size"
            )
        self.rank, self.world_size = int(rank), int(world_size)

    @property
    def batches_per_rank(self) -> int:
        return self.samples_per_epoch // self.batch_size // self.world_size

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def batch_indices(self, batch: int) -> range:
        """The stream indices of this rank's ``batch``-th batch of the current epoch."""
        start = self.epoch * self.samples_per_epoch + (batch * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_generator": None}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._generator is None:  # built in the worker: it holds fonts, which are not shared
            self._generator = CaptchaGenerator(self.spec)
        for batch in range(worker, self.batches_per_rank, workers):
            for index in self.batch_indices(batch):
                text, array = self._generator.sample(self.seed, "train", index)
                image = to_chw_uint8(torch.from_numpy(array if array.flags.writeable else array.copy()))
                if self.transform is not None:
                    image = self.transform(image)
                target = torch.tensor(self.charset.encode_batch([text], self.max_length)[0], dtype=torch.long)
                yield {"image": image, "target": target, "length": torch.tensor(len(text))}
