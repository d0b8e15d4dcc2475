"""One training run from a composed config: build (data, backbone, head, task, callbacks, loggers, trainer), fit,
test the best checkpoint, print where everything is."""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, build, build_head, call
from .monitor import tensorboard_logger

__all__ = ["Run", "build_run", "train", "check_output_dir", "check_free_space", "check_multi_node"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The objects of a run, built but not started."""
    cfg: DictConfig
    datamodule: L.LightningDataModule
    task: L.LightningModule
    trainer: Optional[L.Trainer] = None
    callbacks: list = field(default_factory=list)
    loggers: list = field(default_factory=list)


def _group_items(cfg: DictConfig, key: str) -> list[tuple[str, Any]]:
    node = cfg.get(key)
    if node is None:
        return []
    if "_target_" in node:
        return [(key, node)]
    return [(f"{key}.{name}", sub) for name, sub in node.items() if sub is not None and "_target_" in sub]


def check_free_space(path: str, model: Any, copies: int = 3) -> None:
    """Fail before training when the disk under ``path`` cannot hold the run's checkpoints: ``copies`` checkpoints
    (best, last, and the one being written) of the weights plus two optimiser moments each, and 64 MiB for logs."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    needed = copies * (3 * parameters + buffers) + 64 * 2**20
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ConfigError(f"paths.output_dir: only {free / 2**20:.0f} MiB free on the disk holding {path!r}; this "
                          f"run's checkpoints and logs need about {needed / 2**20:.0f} MiB")


_LAUNCHERS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID", "OMPI_COMM_WORLD_RANK")


def check_multi_node(cfg: DictConfig, environ: Optional[dict] = None) -> None:
    """``trainer.num_nodes > 1`` started by hand without the rendezvous variables waits forever for nodes that never
    come: stop with what a node needs instead."""
    environ = os.environ if environ is None else environ
    nodes = int(cfg.get("trainer", {}).get("num_nodes", 1) or 1)
    if nodes <= 1 or any(key in environ for key in _LAUNCHERS):
        return
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if key not in environ]
    if missing:
        raise ConfigError(f"trainer.num_nodes={nodes}: every node must be started with MASTER_ADDR (node 0's address), "
                          f"MASTER_PORT (a free port on node 0) and NODE_RANK (0..{nodes - 1}) set, or under torchrun "
                          f"/ SLURM; {', '.join(missing)} not set. On one machine: trainer.num_nodes=1 "
                          "trainer.devices=<GPUs>")


def check_output_dir(path: str) -> None:
    """Fail before training, not after an epoch, when the output directory cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"paths.output_dir: cannot write to {path!r} ({error.strerror or error})") from error


def build_run(cfg: DictConfig, *, with_trainer: bool = True) -> Run:
    """Instantiate everything; the head's ``in_channels`` (and a fixed-size head's ``in_h`` / ``in_w``) come from the
    backbone (and the data's image size)."""
    datamodule = build(cfg.data, "data")
    backbone = build(cfg.backbone, "backbone")
    head = build_head(cfg, backbone)
    task_factory = build(cfg.task, "task", partial=True)
    task = call(task_factory, "task", cfg.task.get("_target_"), backbone=backbone, head=head)
    run = Run(cfg=cfg, datamodule=datamodule, task=task)
    if with_trainer:
        run.callbacks = [build(node, key) for key, node in _group_items(cfg, "callbacks")]
        run.loggers = [build(node, key) for key, node in _group_items(cfg, "logger")]
        trainer_factory = build(cfg.trainer, "trainer", partial=True)
        run.trainer = call(trainer_factory, "trainer", "lightning.pytorch.Trainer", callbacks=run.callbacks,
                           logger=run.loggers or False)
    return run


def flat_hyperparameters(cfg: DictConfig, groups: tuple[str, ...] = ("backbone", "head", "data", "task", "trainer"),
                         ) -> dict[str, Any]:
    """``{"head.num_clusters": 64, "task.optimizer.lr": 0.003, ...}``: the scalar values of the main groups."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                visit(f"{prefix}.{key}", sub)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[prefix] = "null" if value is None else value
        else:
            flat[prefix] = str(value)

    for group in groups:
        if group in cfg:
            visit(group, OmegaConf.to_container(cfg[group], resolve=True))
    return flat


def _one_console_log() -> None:
    """Under Hydra the root logger prints and writes the run's log file: Lightning's messages go there, once.
    (Imported before Hydra configured logging, Lightning adds its own console handler and stops propagating; imported
    after, it propagates: either way its messages end up printed exactly once, and in the log file.)"""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lightning_log = logging.getLogger(name)
            for handler in list(lightning_log.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    lightning_log.removeHandler(handler)
            lightning_log.propagate = True


def _tensorboard_dir(loggers: list) -> Optional[str]:
    logger = tensorboard_logger(loggers)
    return logger.log_dir if logger is not None else None


def _metric_value(metrics: dict, name: Optional[str]) -> Optional[float]:
    if name is None or name not in metrics:
        return None
    return float(metrics[name])


def train(cfg: DictConfig) -> Optional[float]:
    """Fit (resuming from ``ckpt_path`` when set), test the best checkpoint, print a summary; returns the value
    of ``optimized_metric`` (for Hydra sweepers)."""
    output_dir = cfg.paths.output_dir
    check_output_dir(output_dir)
    _one_console_log()
    L.seed_everything(cfg.seed, workers=True)
    # frozen backbone stages keep their BatchNorm in eval mode on purpose (FeatureExtractor.freeze)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    check_multi_node(cfg)
    run = build_run(cfg)
    check_free_space(output_dir, run.task)
    trainer = run.trainer
    if trainer.is_global_zero:
        log.info("model: %s", run.task.embedder.head)
        OmegaConf.save(cfg, os.path.join(output_dir, "config.yaml"), resolve=False)
    for logger in run.loggers:  # TensorBoard's HParams tab compares the runs of a sweep by these
        logger.log_hyperparams(flat_hyperparameters(cfg))
    # checkpoints hold tensors and plain values only: never unpickle code from a checkpoint file
    trainer.fit(run.task, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(run.task, datamodule=run.datamodule, ckpt_path=best or None, weights_only=True)
        for row in results:
            metrics.update({k: float(v) for k, v in row.items()})
    if trainer.is_global_zero:
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump(metrics, handle, indent=1, sort_keys=True)
        _print_summary(cfg, trainer, metrics, output_dir, _tensorboard_dir(run.loggers))
    return _metric_value(metrics, cfg.get("optimized_metric"))


def _print_summary(cfg: DictConfig, trainer: L.Trainer, metrics: dict, output_dir: str,
                   tensorboard_dir: Optional[str]) -> None:
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("test/", "val/"))}
    lines = ["", "=" * 72, "aggnets run finished"]
    lines += [f"  {k:<24} {v:.4f}" for k, v in shown.items()]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"  best checkpoint          {checkpoint.best_model_path}")
    lines.append(f"  run directory            {os.path.abspath(output_dir)}")
    if tensorboard_dir:
        lines.append(f"  TensorBoard              tensorboard --logdir {os.path.abspath(tensorboard_dir)}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
