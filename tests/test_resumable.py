"""The exact-resume machinery of the training loader: epoch-seeded orders, P x K batches, skipping the batches a
checkpoint had already seen (also with worker processes) and restoring the random generators."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from aggnets_train.datamodule import ImageDataModule
from aggnets_train.resumable import ClassBalancedSampler, EpochShuffleSampler, ResumableLoader


class Indexed(Dataset):
    """Item i is (i, label i % 5): the batches show which indices were loaded."""

    def __init__(self, size: int = 40) -> None:
        self.targets = torch.arange(size) % 5

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return torch.tensor(index), int(self.targets[index])


def _batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [batch[0].tolist() for batch in loader]


def test_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global generator plays no part
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(1)
    assert list(b) != first and list(EpochShuffleSampler(50, seed=4)) != first


def test_class_balanced_batches_hold_p_classes_of_k():
    labels = torch.arange(60) % 6
    sampler = ClassBalancedSampler(labels, samples_per_class=4, batch_size=12, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 60
    for start in range(0, 60, 12):
        batch = labels[order[start:start + 12]]
        values, counts = torch.unique(batch, return_counts=True)
        assert len(values) == 3 and counts.tolist() == [4, 4, 4]
    assert list(ClassBalancedSampler(labels, 4, 12, seed=0)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="divide batch_size"):
        ClassBalancedSampler(labels, 5, 12)
    with pytest.raises(ValueError, match="classes per batch"):
        ClassBalancedSampler(labels, 2, 14)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch_with_the_remaining_batches(num_workers):
    dataset = Indexed()

    def make():
        return ResumableLoader(dataset, batch_size=4, sampler=EpochShuffleSampler(len(dataset), seed=7), seed=7,
                               num_workers=num_workers, persistent_workers=num_workers > 0)

    whole = make()
    expected = _batches(whole, 0) + _batches(whole, 1)

    interrupted = make()
    interrupted.sampler.set_epoch(0)
    iterator = iter(interrupted)
    seen = [next(iterator)[0].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 3)
    del iterator

    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == 10  # Lightning counts the whole epoch
    rest = _batches(resumed, 0)
    assert seen + rest == expected[:10]
    assert _batches(resumed, 1) == expected[10:]  # the next epoch is whole again


def test_state_restores_the_random_generators():
    loader = ResumableLoader(Indexed(), batch_size=4, sampler=EpochShuffleSampler(40))
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    state = loader.state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    loader.load_state_dict(state)
    next(iter(loader))  # restored at the first batch after loading
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_state_is_weights_only_loadable(tmp_path):
    loader = ResumableLoader(Indexed(), batch_size=4, sampler=EpochShuffleSampler(40))
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    loader.load_state_dict(state)
    assert len(next(iter(loader))[0]) == 4


def test_datamodule_carries_the_loader_state_through_a_checkpoint():
    dataset = Indexed()
    module = ImageDataModule(dataset, batch_size=4, seed=1)
    loader = module.train_dataloader()
    iterator = iter(loader)
    first = [next(iterator)[0].tolist() for _ in range(2)]
    state = module.state_dict()

    fresh = ImageDataModule(dataset, batch_size=4, seed=1)
    fresh.load_state_dict(state)  # Lightning restores the data module before it asks for the loader
    rest = [batch[0].tolist() for batch in fresh.train_dataloader()]
    whole = [batch[0].tolist() for batch in ImageDataModule(dataset, batch_size=4, seed=1).train_dataloader()]
    assert first + rest == whole


def _augmented_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    from aggnets.data import ImageFolderDataset
    return ImageFolderDataset(root, image_size=12, augment=True)


def test_augmentations_are_drawn_per_item_so_workers_and_resume_do_not_change_them(tmp_path):
    dataset = _augmented_folder(tmp_path)
    assert dataset.seeded_items
    item = dataset[(3, 1234)]
    assert torch.equal(item[0], dataset[(3, 1234)][0]) and not torch.equal(item[0], dataset[(3, 99)][0])

    def batches(num_workers, state=None, stop=None):
        module = ImageDataModule(dataset, batch_size=4, seed=5, num_workers=num_workers)
        if state is not None:
            module.load_state_dict(state)
        loader = module.train_dataloader()
        out = []
        for batch in loader:
            out.append(batch[0])
            if stop is not None and len(out) == stop:
                return out, module.state_dict()
        return out, None

    whole, _ = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(whole, batches(2)[0]))  # the number of workers plays no part
    first, state = batches(2, stop=1)
    rest, _ = batches(2, state=state)
    assert len(first) + len(rest) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, whole))
