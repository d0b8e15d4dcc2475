"""TensorBoard views of the heads' internals: GeM's p, NetVLAD's alpha and assignment sharpness, cluster usage
(mass histogram, entropy, dead clusters), assignment maps over fixed validation images, and the embedding
projector. The tensors come from :mod:`aggnets.inspection`; this callback only logs them."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from aggnets.inspection import UsageAccumulator, assignment_overlay, codebook_heads, head_internals, head_maps

__all__ = ["HeadMonitor"]


def tensorboard_logger(loggers: list) -> Optional[Any]:
    """The run's TensorBoardLogger, if it has one."""
    return next((logger for logger in loggers if type(logger).__name__ == "TensorBoardLogger"), None)


def _tensorboard(trainer: L.Trainer) -> Optional[Any]:
    logger = tensorboard_logger(trainer.loggers)
    return logger.experiment if logger is not None else None


def _tag(name: str) -> str:
    return f"head/{name}" if name else "head"


class HeadMonitor(L.Callback):
    """Log the head's internals.

    Every ``every_n_steps`` training steps (the first included): every watched value of
    :func:`aggnets.inspection.head_internals` as a scalar (vectors: their mean) and, in TensorBoard, vectors as
    histograms (GeM ``p`` per channel, per-cluster weight norms, mixture weights).
    During validation: the soft-assignment mass per cluster, summed over all positions of all validation images
    (all-reduced across ranks) — logged as a histogram of the per-cluster fractions, their entropy, normalised
    entropy, perplexity and the number of dead clusters (fraction < ``dead_threshold`` / K).
    After validation: the heads' declared maps (``capabilities.maps``, e.g. a codebook head's assignment: arg-max
    channel, shaded by its value) over ``num_images`` fixed validation images, one image grid per map. At the end of fit: ``projector_samples`` validation embeddings in
    the TensorBoard projector, with labels and thumbnails.
    """

    def __init__(self, every_n_steps: int = 50, num_images: int = 8, projector_samples: int = 256,
                 dead_threshold: float = 0.01, thumbnail_size: int = 32) -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.projector_samples = projector_samples
        self.dead_threshold = dead_threshold
        self.thumbnail_size = thumbnail_size
        self._accumulators: dict[str, UsageAccumulator] = {}
        self._hooks: list[Any] = []

    # ---- parameters ------------------------------------------------------------------------------------------
    def _log_internals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer) if trainer.is_global_zero else None
        for name, value in head_internals(pl_module.embedder.head).items():
            tag = _tag(name)
            finite = value[torch.isfinite(value)]
            if value.dim() == 0:
                if torch.isfinite(value):
                    pl_module.log(tag, value, rank_zero_only=True)
                continue
            if finite.numel():
                pl_module.log(f"{tag}_mean", finite.mean(), rank_zero_only=True)
            if writer is not None and finite.numel():
                writer.add_histogram(tag, finite, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps and (trainer.global_step - 1) % self.every_n_steps == 0:  # from the first step on
            self._log_internals(trainer, pl_module)

    # ---- cluster usage over the validation set ---------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        if trainer.sanity_checking:
            return
        for name, head in codebook_heads(pl_module.embedder.head):
            accumulator = UsageAccumulator(head.num_clusters if hasattr(head, "num_clusters") else None,
                                           dead_threshold=self.dead_threshold)
            self._accumulators[name] = accumulator
            self._hooks.append(head.register_forward_hook(self._usage_hook(accumulator)))

    @staticmethod
    def _usage_hook(accumulator: UsageAccumulator) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
            with torch.no_grad():
                mask = args[1] if len(args) > 1 else None
                accumulator.update(module.assignment_map(args[0], mask))
        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        if trainer.sanity_checking:
            return
        writer = _tensorboard(trainer) if trainer.is_global_zero else None
        for name, accumulator in self._accumulators.items():
            if accumulator.mass is None:
                continue
            accumulator.mass = trainer.strategy.reduce(accumulator.mass.to(pl_module.device), reduce_op="sum")
            usage = accumulator.compute()
            tag = _tag(name)
            for key in ("entropy", "normalized_entropy", "perplexity", "dead"):
                pl_module.log(f"{tag}/cluster_{key}", usage[key].float(), rank_zero_only=True)
            if writer is not None:
                writer.add_histogram(f"{tag}/cluster_usage", usage["fractions"].float().cpu(), trainer.global_step)
        self._accumulators = {}
        if writer is not None:
            self._log_assignment_maps(trainer, pl_module, writer)

    # ---- images ----------------------------------------------------------------------------------------------
    def _fixed_images(self, trainer: L.Trainer, count: int) -> tuple[Tensor, Tensor]:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_set", None) or getattr(datamodule, "train_set")
        count = min(count, len(dataset))
        step = max(1, len(dataset) // max(count, 1))
        items = [dataset[i * step] for i in range(count)]
        return torch.stack([item[0] for item in items]), torch.tensor([int(item[1]) for item in items])

    @torch.no_grad()
    def _log_assignment_maps(self, trainer: L.Trainer, pl_module: L.LightningModule, writer: Any) -> None:
        if self.num_images <= 0:
            return
        from torchvision.utils import make_grid
        images, _ = self._fixed_images(trainer, self.num_images)
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.embedder.backbone_output(images.to(pl_module.device))
        for key, value in head_maps(pl_module.embedder.head, out.map, None, out.token).items():
            path, _, name = key.rpartition("/")
            overlay = assignment_overlay(images, value.cpu())
            grid = make_grid(torch.cat([images, overlay]), nrow=len(images), padding=2, pad_value=1.0)
            writer.add_image(f"{_tag(path)}/{name}_map", grid.float().clamp(0, 1), trainer.global_step)
        pl_module.train(was_training)

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer) if trainer.is_global_zero else None
        if writer is None or self.projector_samples <= 0:
            return
        images, labels = self._fixed_images(trainer, self.projector_samples)
        was_training = pl_module.training
        pl_module.eval()
        embeddings = torch.cat([pl_module.embedder(chunk.to(pl_module.device)).float().cpu()
                                for chunk in images.split(64)])
        pl_module.train(was_training)
        dataset = getattr(trainer.datamodule, "val_set", None) or trainer.datamodule.train_set
        classes = getattr(dataset, "classes", None)
        metadata = [classes[y] if classes is not None and y < len(classes) else str(y) for y in labels.tolist()]
        thumbnails = F.interpolate(images.float(), size=(self.thumbnail_size, self.thumbnail_size), mode="bilinear",
                                   align_corners=False, antialias=True).clamp(0, 1)
        writer.add_embedding(embeddings, metadata=metadata, label_img=thumbnails, global_step=trainer.global_step,
                             tag="val_embedding")
        writer.flush()
