"""Training wiring for aggnets: Lightning tasks, the data module, callbacks and the Hydra run. The library
(``aggnets``) never imports this package; nothing here names a head or a backbone (the config does)."""
from .codebook_init import CodebookInit
from .config import ConfigError, build, check_config
from .datamodule import ImageDataModule
from .monitor import HeadMonitor
from .schedules import warmup_multistep
from .tasks import ClassificationTask, EmbeddingTask, MetricLearningTask, retrieval_metrics

__all__ = ["CodebookInit", "ConfigError", "build", "check_config", "ImageDataModule", "HeadMonitor", "ClassificationTask",
           "EmbeddingTask", "MetricLearningTask", "retrieval_metrics", "warmup_multistep"]
