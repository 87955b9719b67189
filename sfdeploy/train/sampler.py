"""Class-balanced sampling for ``sfdeploy finetune --balanced``.

Imported by WORK/config.py through ``custom_imports`` (only when --balanced is used), so that
mmengine can build ``sampler=dict(type='BalancedClassSampler')``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.registry import DATA_SAMPLERS
from torch.utils.data import Sampler


@DATA_SAMPLERS.register_module()
class BalancedClassSampler(Sampler):
    """Each epoch draws ``len(dataset)`` videos with replacement, each class equally likely.

    Rare classes are seen as often as common ones, at the cost of repeating their videos (the
    random crops of the training pipeline make repeats differ). Works under DDP: every rank
    draws the same sequence from ``seed + epoch`` and takes its own slice.
    """

    def __init__(self, dataset: Any, seed: int | None = None) -> None:
        self.rank, self.world_size = get_dist_info()
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        labels = [int(dataset.get_data_info(i)["label"]) for i in range(len(dataset))]
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)
        self.num_samples = math.ceil(len(labels) / self.world_size)
        self.total_size = self.num_samples * self.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(indices[self.rank:self.total_size:self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Called by mmengine's train loop at each epoch: the epoch joins the seed, so each epoch
        draws another sequence, the same on every rank."""
        self.epoch = epoch
