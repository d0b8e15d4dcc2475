"""Fit the codebook heads (NetVLAD, NetBoF, NetFV, BoF, VLAD, FV, pyramids of them) to the training images before
the first step: a NetVLAD with random centroids trains far worse, and does so silently."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from aggnets.codebook import fit_head_codebook
from aggnets.inspection import codebook_heads

__all__ = ["CodebookInit"]

log = logging.getLogger(__name__)


class CodebookInit(L.Callback):
    """At ``on_fit_start``: sample local descriptors of up to ``max_images`` training images through the backbone
    (``per_image`` random positions each), fit the head's codebook (k-means, or a GMM for NetFV) and load it.

    Skipped when ``enabled`` is false, and on resume (the task's ``codebook_initialized`` buffer travels in the
    checkpoint). Under DDP every rank samples its own shard of the images, the fit all-reduces its statistics, and
    rank 0's result is broadcast, so all ranks start from bit-identical heads.
    ``alpha`` / ``scheme`` / ``engine`` / ``iters`` go to :func:`aggnets.codebook.init_head_from_descriptors`.
    """

    def __init__(self, enabled: bool = True, *, max_images: Optional[int] = 2000, per_image: Optional[int] = 100,
                 max_descriptors: Optional[int] = 200_000, batch_size: int = 64, engine: str = "torch",
                 iters: Optional[int] = None, scheme: Optional[str] = None, alpha: Union[float, str, None] = "auto",
                 seed: int = 0, progress: bool = True) -> None:
        self.enabled = enabled
        self.max_images = max_images
        self.per_image = per_image
        self.max_descriptors = max_descriptors
        self.batch_size = batch_size
        self.engine = engine
        self.iters = iters
        self.scheme = scheme
        self.alpha = alpha
        self.seed = seed
        self.progress = progress
        self.summary: dict[str, Any] = {}

    def _loader(self, trainer: L.Trainer) -> DataLoader:
        datamodule = trainer.datamodule
        dataset = datamodule.codebook_dataset() if hasattr(datamodule, "codebook_dataset") else datamodule.train_set
        if self.max_images is not None and len(dataset) > self.max_images:
            generator = torch.Generator().manual_seed(self.seed)
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=generator)[: self.max_images].tolist())
        workers = getattr(datamodule, "num_workers", 0)
        sampler = None
        if trainer.world_size > 1:  # every rank samples its own share of the images (even when they fit one batch)
            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                         shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers, sampler=sampler)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flag = getattr(pl_module, "codebook_initialized", None)
        heads = codebook_heads(pl_module.embedder.head) if hasattr(pl_module, "embedder") else []
        if not heads or (flag is not None and bool(flag)):
            return
        if not self.enabled:
            log.warning("CodebookInit disabled: the codebook heads start from random centroids")
            return
        backbone = pl_module.embedder.backbone
        loader = self._loader(trainer)
        kwargs = {"engine": self.engine, "alpha": self.alpha, "iters": self.iters}
        if self.scheme is not None:
            kwargs["scheme"] = self.scheme
        start = time.perf_counter()
        for name, head in heads:
            summary = fit_head_codebook(head, backbone, loader, per_image=self.per_image,
                                        max_descriptors=self.max_descriptors, device=pl_module.device,
                                        progress=self.progress and trainer.is_global_zero, seed=self.seed, **kwargs)
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in head.state_dict().items()}, src=0)
            head.load_state_dict(state)
            self.summary[name or "head"] = summary
        if flag is not None:
            flag.fill_(True)
        checksum = sum(float(p.double().sum()) for _, head in heads for p in head.state_dict().values()
                       if p.is_floating_point())
        log.info("codebook checksum on rank %d: %.12e", trainer.global_rank, checksum)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            for name, summary in self.summary.items():
                shown = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
                log.info("codebook of %s fitted in %.1f s: %s", name, seconds, shown)
