"""LightningModules that wire an :class:`aggnets.Embedder` into a training task. They name no head or backbone:
both arrive built (the head as a factory of ``in_channels``) from the Hydra config."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from aggnets.models import Classifier, Embedder

__all__ = ["EmbeddingTask", "ClassificationTask", "MetricLearningTask", "retrieval_metrics", "place_recall",
           "gather_with_grad", "metric_loss"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
_TOTAL_STEPS_ARGS = ("total_steps", "T_max", "total_iters")


class EmbeddingTask(L.LightningModule):
    """What both tasks share: the model (an :class:`aggnets.Embedder`, or a :class:`aggnets.Classifier` around
    one; ``task.model`` is a plain module to use elsewhere), the optimiser with its two learning rates, the scheduler, and
    optional ``torch.compile``; ``whitening`` (a file of :func:`aggnets.retrieval.save_whitening`) appends a fitted
    whitening to the embedder, trained with the head and saved in the checkpoint; ``context_gating`` appends a
    :class:`aggnets.heads.ContextGating` after the head (and projection), ``context_gating_batch_norm`` with LOUPE's
    batch norm.

    ``optimizer`` / ``scheduler`` are factories (``_partial_: true`` in the config). The backbone trains at
    ``backbone_lr`` (None = the optimiser's lr; 0 freezes it), everything else at the optimiser's lr. A scheduler
    whose signature has ``total_steps`` / ``T_max`` / ``total_iters`` left unset gets the run's number of optimiser
    steps, and steps every batch (``steps_per_epoch``: the run's optimiser steps per epoch).
    """

    def __init__(self, backbone: nn.Module, head: Any, *, optimizer: OptimizerFactory,
                 scheduler: Optional[SchedulerFactory] = None, backbone_lr: Optional[float] = None,
                 projection_dim: Optional[int] = None, normalize: bool = True, compile: bool = False,
                 whitening: Optional[str] = None, context_gating: bool = False,
                 context_gating_batch_norm: bool = False) -> None:
        super().__init__()
        self.model: nn.Module = Embedder(backbone, head, projection_dim=projection_dim, normalize=normalize,
                                         context_gating=context_gating,
                                         context_gating_batch_norm=context_gating_batch_norm)
        if whitening:  # a file from aggnets.retrieval.save_whitening: fine-tuned with the head
            from aggnets.retrieval import load_whitening
            self.embedder.set_whitening(load_whitening(whitening))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone_lr = backbone_lr
        self.compile = compile
        self._compiled: Optional[Callable[..., Tensor]] = None
        # set by aggnets_train.CodebookInit (codebook_init.py); saved in checkpoints so a resumed run does not refit
        self.register_buffer("codebook_initialized", torch.tensor(False))

    @property
    def embedder(self) -> Embedder:
        """The descriptor part of :attr:`model` (the model itself for metric learning)."""
        return self.model if isinstance(self.model, Embedder) else self.model.embedder

    @property
    def head(self) -> nn.Module:
        return self.embedder.head

    def setup(self, stage: str) -> None:
        if self.compile and self._compiled is None:
            self._compiled = torch.compile(self.embedder)

    def embed(self, images: Tensor) -> Tensor:
        return (self._compiled if self._compiled is not None else self.embedder)(images)

    def configure_optimizers(self) -> Any:
        backbone_params = [p for p in self.embedder.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone_params}
        other_params = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": other_params, "name": "head"}]
        if backbone_params and self.backbone_lr != 0:
            group = {"params": backbone_params, "name": "backbone"}
            if self.backbone_lr is not None:
                group["lr"] = self.backbone_lr
            groups.append(group)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self._build_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        factory = self.scheduler_factory
        given = getattr(factory, "keywords", {}) or {}
        target = getattr(factory, "func", factory)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}
        extra = {}
        for name in _TOTAL_STEPS_ARGS:
            if name in params and given.get(name) is None:
                extra[name] = int(self.trainer.estimated_stepping_batches)
        required = "steps_per_epoch" in params and params["steps_per_epoch"].default is inspect.Parameter.empty
        if required and given.get("steps_per_epoch") is None:  # not OneCycleLR's optional one
            epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            extra["steps_per_epoch"] = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
        if "max_lr" in params and "max_lr" not in given:
            extra["max_lr"] = [group["lr"] for group in optimizer.param_groups]
        return factory(optimizer, **extra)


class ClassificationTask(EmbeddingTask):
    """backbone -> head -> (projection) -> batch norm -> linear classifier; cross-entropy; top-1 accuracy."""

    def __init__(self, backbone: nn.Module, head: Any, *, num_classes: int, optimizer: OptimizerFactory,
                 scheduler: Optional[SchedulerFactory] = None, backbone_lr: Optional[float] = None,
                 projection_dim: Optional[int] = None, label_smoothing: float = 0.0, dropout: float = 0.0,
                 compile: bool = False, context_gating: bool = False,
                 context_gating_batch_norm: bool = False) -> None:
        super().__init__(backbone, head, optimizer=optimizer, scheduler=scheduler, backbone_lr=backbone_lr,
                         projection_dim=projection_dim, normalize=False, compile=compile,
                         context_gating=context_gating, context_gating_batch_norm=context_gating_batch_norm)
        self.model = Classifier(self.embedder, num_classes, dropout=dropout)
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.metrics = nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")
                                      for stage in ("train", "val", "test")})

    def forward(self, images: Tensor) -> Tensor:
        return self.model.logits(self.embed(images))

    def _step(self, batch: Any, stage: str) -> Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        metric = self.metrics[f"{stage}_acc"]
        metric(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=len(labels))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")


def retrieval_metrics(embeddings: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Tensor]:
    """Leave-one-out retrieval over a labelled set: every item queries all the others by inner product; the
    relevant items share its label. mAP (torchmetrics ``RetrievalMAP``) and recall@k = fraction of queries with a
    relevant item in their top k (torchmetrics ``RetrievalHitRate``, the metric-learning / place-recognition
    "Recall@K"). Queries without any relevant item are skipped."""
    n = len(labels)
    if n < 2:
        raise ValueError(f"retrieval_metrics needs at least 2 items, got {n}")
    embeddings = embeddings.float()
    scores = embeddings @ embeddings.T
    relevant = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    has_positive = (relevant & off_diagonal).any(dim=1)
    queries = torch.arange(n, device=labels.device)[:, None].expand(n, n)
    keep = off_diagonal & has_positive[:, None]
    preds, target, indexes = scores[keep], relevant[keep], queries[keep]
    out = {"mAP": RetrievalMAP()(preds, target, indexes=indexes)}
    for k in ks:
        out[f"recall@{k}"] = RetrievalHitRate(top_k=k)(preds, target, indexes=indexes)
    return out


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def gather_with_grad(values: Tensor) -> Tensor:
    """Every rank's rows in rank order (ranks may hold different counts); this rank's own rows are ``values``
    itself, so its gradient flows, the others' are copies. Outside ``torch.distributed``: ``values``."""
    if not _distributed():
        return values
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    count = torch.tensor([len(values)], device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = values.new_zeros((max(sizes), *values.shape[1:]))
    padded[: len(values)] = values.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    parts = [part[:size] for part, size in zip(parts, sizes)]
    parts[rank] = values
    return torch.cat(parts)


def metric_loss(loss_fn: nn.Module, miner: Optional[nn.Module], embeddings: Tensor, labels: Tensor
                ) -> tuple[Tensor, int]:
    """The metric-learning loss of a batch, mined and computed on the global batch under ``torch.distributed``:
    ``(loss, scale)``. Every rank gathers all ranks' embeddings and labels (:func:`gather_with_grad`: its own part
    keeps its gradient), so every rank computes the loss a single process would on the concatenated batch; DDP then
    averages the ranks' gradients, each holding only its own part's share, so backpropagating ``scale * loss``
    (scale = the world size, 1 outside DDP) gives exactly the single-process gradient. pytorch-metric-learning's
    ``DistributedLossWrapper`` / ``DistributedMinerWrapper`` do the same with a gather each and each rank's own
    rows first (a rank-dependent order); here one gather serves both and the order is the ranks'."""
    scale = 1
    if _distributed():
        embeddings, labels = gather_with_grad(embeddings), gather_with_grad(labels)
        scale = torch.distributed.get_world_size()
    pairs = miner(embeddings, labels) if miner is not None else None
    return loss_fn(embeddings, labels, pairs), scale


def place_recall(embeddings: Tensor, indices: Tensor, place_set: Any, ks: tuple[int, ...] = (1, 5, 10)
                 ) -> dict[str, float]:
    """recall@k (percent) of a place-recognition set from the descriptors of its images (``indices`` into database
    then queries, in any order, repeats allowed: a distributed sampler pads the last batch): each query's k nearest
    database descriptors (inner product) against its positives (:func:`aggnets.retrieval.recall_at_n_positives`)."""
    from aggnets.retrieval import knn, recall_at_n_positives

    count = len(place_set.database) + len(place_set.queries)
    table = embeddings.new_zeros((count, embeddings.shape[1]))
    seen = torch.zeros(count, dtype=torch.bool, device=embeddings.device)
    table[indices] = embeddings
    seen[indices] = True
    if not bool(seen.all()):
        raise RuntimeError(f"{place_set.name}: descriptors of {int((~seen).sum())} of its {count} images are missing "
                           "(trainer.limit_val_batches / limit_test_batches cut the set short? recall@N needs all)")
    database, queries = table[: len(place_set.database)].cpu(), table[len(place_set.database):].cpu()
    k = min(max(ks), len(database))
    _, ranks = knn(queries, database, k, engine="torch")
    result = recall_at_n_positives(ranks.numpy(), place_set.positives, [n for n in ks if n <= k])
    return {key: float(value) for key, value in result.items() if key.startswith("R@")}


class MetricLearningTask(EmbeddingTask):
    """backbone -> head -> (projection) -> L2 embedding, trained with a pytorch-metric-learning loss (and
    optional miner) on P x K batches, mined on the global batch under DDP (:func:`metric_loss`); validated by
    leave-one-out retrieval (mAP, recall@k) over the whole labelled validation set and / or by recall@k on
    place-recognition sets (the data module's ``val_sets``: ``val/<set>/R@k``), gathered across ranks."""

    def __init__(self, backbone: nn.Module, head: Any, *, loss: nn.Module, optimizer: OptimizerFactory,
                 miner: Optional[nn.Module] = None, scheduler: Optional[SchedulerFactory] = None,
                 backbone_lr: Optional[float] = None, projection_dim: Optional[int] = None,
                 recall_ks: tuple[int, ...] = (1, 5, 10), compile: bool = False,
                 whitening: Optional[str] = None, context_gating: bool = False,
                 context_gating_batch_norm: bool = False) -> None:
        super().__init__(backbone, head, optimizer=optimizer, scheduler=scheduler, backbone_lr=backbone_lr,
                         projection_dim=projection_dim, normalize=True, compile=compile, whitening=whitening,
                         context_gating=context_gating, context_gating_batch_norm=context_gating_batch_norm)
        self.loss = loss
        self.miner = miner
        self.recall_ks = tuple(recall_ks)
        self._outputs: dict[str, dict[int, list[tuple[Tensor, Tensor]]]] = {"val": {}, "test": {}}

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        loss, scale = metric_loss(self.loss, self.miner, self(images).float(), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss * scale

    def _collect(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        images, labels = batch[0], batch[1]
        self._outputs[stage].setdefault(dataloader_idx, []).append((self(images).float().detach(), labels.detach()))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, "test", dataloader_idx)

    def _kinds(self, stage: str) -> list:
        """What each loader of ``stage`` holds (the data module's ``val_kinds`` / ``test_kinds``): a labelled set
        by default, or ``(name, place_set)``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, f"{stage}_kinds", None) or [])

    def _evaluate(self, stage: str) -> None:
        outputs, self._outputs[stage] = self._outputs[stage], {}
        kinds = self._kinds(stage)
        for index in sorted(outputs):
            embeddings = torch.cat([e for e, _ in outputs[index]])
            labels = torch.cat([y for _, y in outputs[index]])
            if self.trainer.world_size > 1:
                embeddings = self._gather(embeddings)
                labels = self._gather(labels)
            name, place_set = kinds[index] if index < len(kinds) else ("labels", None)
            if place_set is None:
                self.log(f"{stage}/queries", float(len(labels)), rank_zero_only=False, add_dataloader_idx=False)
                for metric, value in retrieval_metrics(embeddings, labels, self.recall_ks).items():
                    self.log(f"{stage}/{metric}", value, prog_bar=metric in ("mAP", "recall@1"),
                             rank_zero_only=False, add_dataloader_idx=False)
            else:
                for metric, value in place_recall(embeddings, labels, place_set, self.recall_ks).items():
                    self.log(f"{stage}/{name}/{metric}", value, prog_bar=metric == "R@1", rank_zero_only=False,
                             add_dataloader_idx=False)

    def _gather(self, values: Tensor) -> Tensor:
        """All ranks' rows, concatenated in rank order (ranks may hold different counts)."""
        return gather_with_grad(values)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")
