"""The training configs: every backbone group x every head group composes, instantiates (the head's in_channels
from the backbone) and runs one forward; bad configs fail with one error that names the key."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import aggnets
from aggnets_train.config import ConfigError, build, build_head
from aggnets_train.run import build_run

CONF = Path(__file__).resolve().parents[1] / "conf"
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
HEADS = sorted(p.stem for p in (CONF / "head").glob("*.yaml"))
GROUPS = ("backbone", "head", "data", "task", "metric_loss", "trainer", "logger", "callbacks", "experiment", "hparams_search")


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def small(name: str) -> list[str]:
    """Overrides that keep a backbone config cheap: random weights; a vision transformer with one block (ViT-G's 40
    blocks are 1.1 B parameters)."""
    overrides = [f"backbone={name}", "backbone.weights=null"]
    if "model_kwargs" in OmegaConf.load(CONF / "backbone" / f"{name}.yaml"):
        overrides += ["backbone.model_kwargs={depth: 1}", "backbone.layer=-1", "backbone.freeze=false"]
    return overrides


@functools.lru_cache(maxsize=None)
def backbone_and_map(name: str):
    cfg = compose_train(*small(name))
    backbone = build(cfg.backbone, "backbone").eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 64))
    return backbone, features


def test_config_groups_exist():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), f"conf/{group}/ is empty"
    assert sorted(HEADS) == aggnets.list_heads()
    assert {"resnet18", "resnet50", "vgg16", "efficientnet_lite0", "mobilenet_v2", "vit_b16"} <= set(BACKBONES)
    assert {f"dinov2_vit{size}14{reg}" for size in "sblg" for reg in ("", "_reg4")} <= set(BACKBONES)
    assert {"classification", "metric_learning"} <= {p.stem for p in (CONF / "task").glob("*.yaml")}
    assert {"cpu", "gpu", "ddp", "debug"} <= {p.stem for p in (CONF / "trainer").glob("*.yaml")}


# every backbone with a plain and a token head; every head on a CNN of each library and a ViT
REPRESENTATIVE = ("efficientnet_lite0", "resnet50", "dinov2_vits14_reg4")
PAIRS = sorted({(b, h) for b in BACKBONES for h in ("gem", "class_token")}
               | {(b, h) for b in REPRESENTATIVE for h in HEADS})


@pytest.mark.parametrize("backbone_name,head_name", PAIRS)
def test_every_head_and_every_backbone(backbone_name, head_name):
    cfg = compose_train(*small(backbone_name), f"head={head_name}")
    backbone, features = backbone_and_map(backbone_name)
    head = build_head(cfg, backbone)
    assert type(head) is aggnets.get_head_class(head_name)
    assert head.in_channels == backbone.out_channels == features.shape[1]
    with torch.no_grad():
        out = head(features)
    assert out.shape == (1, head.out_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("task", ["classification", "metric_learning", "metric_learning,metric_loss=contrastive",
                                  "metric_learning,metric_loss=triplet"])
def test_tasks_build_on_the_embedded_default(task, tmp_path):
    task, *extra = task.split(",")
    overrides = [f"task={task}", *extra, f"paths.output_dir={tmp_path}", "trainer=debug", "data.train.size=64",
                 "data.val.size=32", "data.test.size=32"]
    if task != "classification":
        overrides += ["data.samples_per_class=4", "data.batch_size=40"]
    run = build_run(compose_train(*overrides))
    assert run.task.embedder.head.in_channels == run.task.embedder.backbone.out_channels
    assert {type(c).__name__ for c in run.callbacks} >= {"ModelCheckpoint", "CodebookInit", "HeadMonitor"}
    batch = next(iter(run.datamodule.train_dataloader()))
    out = run.task(batch[0])
    assert len(out) == len(batch[0]) and torch.isfinite(out).all()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment):
    cfg = compose_train(f"experiment={experiment}")
    OmegaConf.to_container(cfg.task, resolve=True)
    assert cfg.backbone._target_ and cfg.head._target_


def test_unknown_head_names_the_group_and_choices():
    with pytest.raises(MissingConfigException, match=r"head/netvald[\s\S]*netvlad"):
        compose_train("head=netvald")


def test_layer_missing_from_backbone_names_the_key():
    cfg = compose_train("backbone=resnet18", "backbone.weights=null", "backbone.layer=layer9")
    with pytest.raises(ConfigError, match=r"^backbone .*layer9.*layer4"):
        build(cfg.backbone, "backbone")


def test_head_option_of_the_wrong_type_names_the_key():
    cfg = compose_train("head=netvlad", "head.num_clusters=many")
    with pytest.raises(ConfigError, match=r"^head\.num_clusters: expected int, got 'many'"):
        build(cfg.head, "head", partial=True)
    cfg = compose_train("head=gem", "head.p=[1,2]")
    with pytest.raises(ConfigError, match=r"^head\.p: expected float"):
        build(cfg.head, "head", partial=True)


def test_unknown_head_option_names_the_key_and_valid_ones():
    cfg = compose_train("head=netvlad", "+head.clusters=8")
    with pytest.raises(ConfigError, match=r"^head\.clusters: not an argument of aggnets\.heads\.NetVLAD; "
                                          r"valid: .*num_clusters"):
        build(cfg.head, "head", partial=True)


def test_nested_option_errors_name_the_full_key():
    cfg = compose_train("task.optimizer.lr=fast")
    with pytest.raises(ConfigError, match=r"^task\.optimizer\.lr: expected"):
        build(cfg.task, "task", partial=True)


def test_missing_required_value_names_the_key():
    cfg = compose_train("data=image_folder", "data.num_classes=3")
    with pytest.raises(ConfigError, match=r"^data\.train\.root: required value missing"):
        build(cfg.data, "data")


def test_a_value_the_head_rejects_names_the_head():
    cfg = compose_train("head=netvlad", "head.num_clusters=0")
    with pytest.raises(ConfigError, match=r"^head \(aggnets\.heads\.NetVLAD\): ValueError: .*num_clusters"):
        build_head(cfg, 8)


def test_p_by_k_batches_need_enough_classes():
    cfg = compose_train("data.samples_per_class=4", "data.batch_size=64", "data.train.size=64")
    with pytest.raises(ConfigError, match=r"^data .*16 classes per batch, but the training set has only 10"):
        build(cfg.data, "data")


def test_hparams_search_is_a_multirun_grid():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=motifs_netvlad"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"head.num_clusters", "task.optimizer.lr"}
    assert cfg.optimized_metric == "val/acc"


def test_misspelt_override_keys_name_the_valid_keys_and_the_closest():
    from aggnets_train.overrides import check_overrides

    assert check_overrides("train", ["head=gem", "head.p=4", "seed=3", "+head.extra=1", "hydra.run.dir=/tmp/x",
                                     "trainer.max_epochs=2", "experiment=motifs_metric_learning"]) == []
    [error] = check_overrides("train", ["trainer.max_epoch=3"])
    assert error.startswith("trainer.max_epoch: no key 'max_epoch' in trainer; did you mean 'trainer.max_epochs'?")
    assert "valid keys: _target_, accelerator" in error and "+trainer.max_epoch=..." in error
    # group choices are applied first: GeM has no num_clusters, NetVLAD (the default head) has
    [error] = check_overrides("train", ["head=gem", "head.num_clusters=8"])
    assert "no key 'num_clusters' in head" in error and "learn_p" in error
    assert check_overrides("train", ["head.num_clusters=8"]) == []
    [error] = check_overrides("train", ["sed=1"])
    assert "no key 'sed' in the config; did you mean 'seed'?" in error
    [error] = check_overrides("evaluate", ["evl.csv=x"])
    assert "did you mean 'eval'?" in error


def test_train_py_stops_on_a_misspelt_key_before_running():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(CONF.parent / "train.py"), "data.batch_sise=8"], capture_output=True,
                            text=True, timeout=120, cwd=CONF.parent)
    assert result.returncode == 2
    assert "Config error: data.batch_sise: no key 'batch_sise' in data; did you mean 'data.batch_size'?" in result.stderr


def test_a_fixed_size_heads_map_size_is_derived_from_the_backbone_and_the_image_size():
    """head=mixvpr just works: in_h / in_w left at ??? become the map the training images give; set, they stay."""
    cfg = compose_train("head=mixvpr", "backbone.weights=null", "data.train.image_size=96")
    backbone = build(cfg.backbone, "backbone")
    head = build_head(cfg, backbone)
    assert head.map_size == backbone.output_size(96, 96) == (cfg.head.in_h, cfg.head.in_w)
    explicit = compose_train("head=mixvpr", "backbone.weights=null", "head.in_h=5", "head.in_w=7")
    assert build_head(explicit, backbone).map_size == (5, 7)
    bare = OmegaConf.create({"head": {"_target_": "aggnets.heads.MixVPR", "in_channels": "???", "in_h": "???",
                                      "in_w": "???"}})
    with pytest.raises(ConfigError, match=r"head.in_h: .*set head.in_h and head.in_w"):
        build_head(bare, backbone)
