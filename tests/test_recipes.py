"""The GSV-Cities recipes (conf/experiment/gsv_cities_*) against the authors' training configurations, written here
from their repositories (amaralibey/MixVPR main.py, amaralibey/gsv-cities main.py, amaralibey/Bag-of-Queries
train.py, serizba/salad main.py), the warm-up + multi-step schedule against hand-computed factors, and the recipes
run end to end on a GSV-Cities-layout fixture validated on an index-layout set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from aggnets_train.run import build_run, train
from aggnets_train.schedules import warmup_multistep
from tests.test_gsv_cities import write_gsv
from tests.test_vpr_sets import write_index_set

CONF = Path(__file__).resolve().parents[1] / "conf"
REQUIRED = ["data.train.root=/data/gsv_cities", "data.val_root=/data/vpr"]

# recipe: (places x K, train size, val size, optimizer (target, lr, weight decay, momentum), schedule, epochs,
#          backbone (layer, freeze), head values, validation sets, checkpoint metric)
AUTHORS = {
    "gsv_cities_resnet50_mixvpr": (120 * 4, 320, [320, 320], ("torch.optim.SGD", 0.05, 1e-3, 0.9),
                                   {"warmup_steps": 650, "milestones": [5, 10, 15, 25, 45], "gamma": 0.3}, 80,
                                   ("layer3", "layer2"), {"out_channels": 1024, "mix_depth": 4, "mlp_ratio": 1,
                                                          "out_rows": 4},
                                   ["pitts30k_val", "pitts30k_test", "msls_val"], "val/pitts30k_val/R@1"),
    "gsv_cities_resnet50_convap": (100 * 4, 320, [320, 320], ("torch.optim.AdamW", 2e-4, 0.0, None),
                                   {"warmup_steps": 600, "milestones": [5, 10, 15, 25], "gamma": 0.3}, 30,
                                   ("layer4", "layer2"), {"out_channels": 1024, "s1": 2, "s2": 2},
                                   ["pitts30k_val", "msls_val"], "val/pitts30k_val/R@1"),
    "gsv_cities_resnet50_boq": (128 * 4, 320, [384, 384], ("torch.optim.AdamW", 1e-4, 1e-4, None),
                                {"warmup_epochs": 10, "milestones": [10, 20], "gamma": 0.1}, 40,
                                ("layer3", "layer1"), {"proj_channels": 512, "num_queries": 64, "num_layers": 2,
                                                       "row_dim": 32},
                                ["msls_val", "pitts30k_val"], "val/msls_val/R@1"),
    "gsv_cities_dinov2_boq": (128 * 4, 224, [322, 322], ("torch.optim.AdamW", 1e-4, 1e-4, None),
                              {"warmup_epochs": 10, "milestones": [10, 20], "gamma": 0.1}, 40,
                              ("blocks.11", "blocks.9"), {"proj_channels": 384, "num_queries": 64, "num_layers": 2,
                                                          "row_dim": 32},
                              ["msls_val", "pitts30k_val"], "val/msls_val/R@1"),
    "gsv_cities_dinov2_salad": (60 * 4, 224, [322, 322], ("torch.optim.AdamW", 6e-5, 9.5e-9, None),
                                {"start_factor": 1.0, "end_factor": 0.2, "total_iters": 4000}, 4,
                                ("blocks.11", "blocks.7"), {"num_clusters": 64, "cluster_dim": 128, "token_dim": 256},
                                ["pitts30k_val", "pitts30k_test", "msls_val"], "val/pitts30k_val/R@1"),
}


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_a_recipe_is_the_authors_configuration(recipe):
    batch, size, val_size, optimizer, schedule, epochs, backbone, head, val_sets, monitor = AUTHORS[recipe]
    cfg = compose_train(f"experiment={recipe}", *REQUIRED)
    assert cfg.data.batch_size == batch and cfg.data.samples_per_class == 4 and cfg.data.each_class_once
    assert cfg.data.train._target_ == "aggnets.data.GSVCitiesDataset" and cfg.data.train.augment == "randaugment"
    assert cfg.data.train.image_size == size and list(cfg.data.val_image_size) == val_size
    target, lr, weight_decay, momentum = optimizer
    opt = cfg.task.optimizer
    assert (opt._target_, opt.lr, opt.weight_decay, opt.get("momentum")) == (target, lr, weight_decay, momentum)
    assert cfg.task.backbone_lr is None  # one learning rate for the trained blocks and the head, as theirs
    assert {k: cfg.task.scheduler[k] for k in schedule} == schedule
    assert (cfg.task.loss.alpha, cfg.task.loss.beta, cfg.task.loss.base, cfg.task.miner.epsilon) == (1, 50, 0, 0.1)
    assert cfg.trainer.max_epochs == epochs and cfg.trainer.precision == "16-mixed"
    assert (cfg.backbone.layer, cfg.backbone.freeze) == backbone
    assert {k: cfg.head[k] for k in head} == head
    assert list(cfg.data.val_sets) == val_sets and cfg.monitor.metric == monitor


def test_the_other_recipes_compose_and_dinov2_keeps_their_norm_choice():
    for recipe in ("gsv_cities_resnet50_netvlad", "gsv_cities_resnet50_cosplace_head"):
        cfg = compose_train(f"experiment={recipe}", *REQUIRED)
        assert cfg.data.train._target_ == "aggnets.data.GSVCitiesDataset" and cfg.monitor.metric.startswith("val/")
    assert compose_train("experiment=gsv_cities_dinov2_salad", *REQUIRED).backbone.norm is True
    assert compose_train("experiment=gsv_cities_dinov2_boq", *REQUIRED).backbone.norm is False


def test_warmup_multistep_factors():
    """MixVPR's schedule with 10 steps per epoch: lr * min(1, (s + 1) / 650) ... here 25 warm-up steps, then x 0.3 at
    epochs 2 and 4."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = warmup_multistep(optimizer, steps_per_epoch=10, milestones=[4, 2], gamma=0.3, warmup_steps=25)
    seen = []
    for _ in range(50):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [min(1.0, (s + 1) / 25) * 0.3 ** ((s // 10 >= 2) + (s // 10 >= 4)) for s in range(50)]
    assert seen == pytest.approx(expected, rel=1e-12)
    epochs = warmup_multistep(torch.optim.SGD([weight], lr=1.0), steps_per_epoch=4, warmup_epochs=2)
    assert epochs.lr_lambdas[0](0) == pytest.approx(1 / 8) and epochs.lr_lambdas[0](7) == 1.0


@pytest.fixture()
def layouts(tmp_path):
    write_gsv(tmp_path / "gsv", {"Rome": {i: 4 for i in range(6)}, "Oslo": {i: 5 for i in range(4)}})
    write_index_set(tmp_path / "vpr" / "SPEDTEST", tmp_path / "vpr" / "SPED", "SPED")
    return tmp_path


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.train.root={tmp_path / 'gsv'}", f"data.val_root={tmp_path / 'vpr'}", "data.val_sets=[sped]",
            "monitor.metric=val/sped/R@1", "task.recall_ks=[1,4]", "data.batch_size=8", "data.num_workers=0",
            "trainer=cpu", "trainer.precision=32-true", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "backbone.weights=null", "callbacks.head_monitor=null", "logger=csv",
            f"paths.output_dir={tmp_path / 'run'}", *extra]


def test_the_mixvpr_recipe_trains_on_gsv_cities_and_validates_on_sped(layouts):
    cfg = compose_train("experiment=gsv_cities_resnet50_mixvpr", *_tiny(
        layouts, "data.train.image_size=64", "data.val_image_size=[64,64]", "head.out_channels=8", "head.out_rows=2"))
    train(cfg)
    results = json.loads((layouts / "run" / "results.json").read_text())
    assert results["val/sped/R@4"] == pytest.approx(200 / 3) and "test/sped/R@1" in results
    assert results["train/loss"] > 0


def test_the_salad_recipe_builds_on_a_small_random_dinov2(layouts):
    cfg = compose_train("experiment=gsv_cities_dinov2_salad", *_tiny(
        layouts, "data.train.image_size=28", "data.val_image_size=[28,28]", "backbone.freeze=blocks.0",
        "backbone.layer=blocks.1", "+backbone.model_kwargs={embed_dim:24,depth:2,num_heads:2}",
        "head.num_clusters=4", "head.cluster_dim=4", "head.token_dim=4", "task.scheduler.total_iters=3"))
    run = build_run(cfg)
    run.trainer.fit(run.task, datamodule=run.datamodule)
    assert "val/sped/R@1" in run.trainer.callback_metrics
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler).__name__ == "LinearLR" and scheduler.total_iters == 3
