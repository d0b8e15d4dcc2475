"""Real training runs, small: a few steps per task in-process, the TensorBoard tags of the head monitor, train.py
end to end, DDP with 2 CPU processes (gloo), and resuming a run killed with SIGKILL mid-epoch."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from aggnets_train.run import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# a run of seconds: 64 px motif images, few of them, a frozen backbone up to blocks.1 (the default)
SMALL = ["data.train.size=96", "data.val.size=40", "data.test.size=40", "data.batch_size=16",
         "callbacks.codebook_init.max_images=64", "callbacks.head_monitor.projector_samples=24",
         "callbacks.head_monitor.num_images=4", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
         "trainer.log_every_n_steps=1"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def tensorboard_tags(run_dir: Path) -> dict[str, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags: dict[str, set[str]] = {"scalars": set(), "histograms": set(), "images": set()}
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    return tags


def test_classification_trains_and_logs_the_head_internals(tmp_path):
    metric = train(compose_train(*SMALL, f"paths.output_dir={tmp_path}", "head.num_clusters=8",
                                 "trainer.limit_train_batches=4"))
    assert metric is not None and 0.0 <= metric <= 1.0
    tags = tensorboard_tags(tmp_path)
    assert {"train/loss_step", "val/acc", "test/acc", "head/alpha", "head/cluster_entropy",
            "head/cluster_normalized_entropy", "head/cluster_perplexity", "head/cluster_dead",
            "head/assign_weight_norm_mean", "lr-AdamW/head", "lr-AdamW/backbone"} <= tags["scalars"], tags["scalars"]
    assert {"head/cluster_usage", "head/assign_weight_norm", "head/centroid_norm"} <= tags["histograms"]
    assert "head/assignment_map" in tags["images"]
    projector = (tmp_path / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "val_embedding" in projector and "metadata" in projector and "sprite" in projector
    checkpoints = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)


def test_bf16_mixed_precision_trains(tmp_path):
    metric = train(compose_train(*SMALL, f"paths.output_dir={tmp_path}", "trainer.precision=bf16-mixed",
                                 "head.num_clusters=8", "trainer.limit_train_batches=2", "test=false"))
    assert metric is not None and 0.0 <= metric <= 1.0


def test_gem_p_is_logged_per_channel(tmp_path):
    train(compose_train(*SMALL, f"paths.output_dir={tmp_path}", "head=gem", "head.per_channel=true",
                        "trainer.limit_train_batches=2", "test=false"))
    tags = tensorboard_tags(tmp_path)
    assert "head/p" in tags["histograms"] and "head/p_mean" in tags["scalars"]


def test_codebook_is_fitted_before_training_and_not_refitted_on_resume(tmp_path):
    from aggnets_train.run import build_run
    cfg = compose_train(*SMALL, f"paths.output_dir={tmp_path}", "head.num_clusters=8", "trainer.max_steps=1",
                        "trainer.limit_val_batches=0", "test=false")
    run = build_run(cfg)
    before = run.task.embedder.head.centroids.detach().clone()
    run.trainer.fit(run.task, datamodule=run.datamodule)
    init = next(c for c in run.callbacks if type(c).__name__ == "CodebookInit")
    assert bool(run.task.codebook_initialized) and init.summary["head"]["descriptors"] > 0
    assert not torch.allclose(before, run.task.embedder.head.centroids)
    again = build_run(cfg)
    again.trainer.fit(again.task, datamodule=again.datamodule, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    second = next(c for c in again.callbacks if type(c).__name__ == "CodebookInit")
    assert second.summary == {}  # restored from the checkpoint, not refitted


def test_metric_learning_trains_with_p_by_k_batches_and_retrieval_metrics(tmp_path):
    metric = train(compose_train(*SMALL, f"paths.output_dir={tmp_path}", "experiment=motifs_metric_learning",
                                 "data.batch_size=16", "data.samples_per_class=4", "trainer.limit_train_batches=3",
                                 "task.projection_dim=32"))
    assert metric is not None and 0.0 < metric <= 1.0
    tags = tensorboard_tags(tmp_path)
    assert {"val/mAP", "val/recall@1", "val/recall@5", "test/mAP", "train/loss_step"} <= tags["scalars"]


def write_image_tree(root: Path, classes: int, per_class: int) -> None:
    """A folder tree of real PNG files (motif images), one folder per class / landmark."""
    from PIL import Image
    from aggnets.data import MotifDataset
    motifs = MotifDataset("train", size=classes * per_class, image_size=48, num_classes=classes)
    for index in range(len(motifs)):
        image, label = motifs[index]
        folder = root / f"id{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"{index}.png")


def test_image_folder_classification_and_landmark_metric_learning(tmp_path):
    write_image_tree(tmp_path / "images", classes=6, per_class=8)
    common = ["trainer.enable_progress_bar=false", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
              "data.num_workers=0", "data.train.image_size=48", "head.num_clusters=4",
              "callbacks.codebook_init.max_images=16", "callbacks.head_monitor.projector_samples=8",
              f"data.train.root={tmp_path / 'images'}"]
    accuracy = train(compose_train(*common, "data=image_folder", "data.num_classes=6", "data.batch_size=8",
                                   "data.train.val_fraction=0.25", "data.train.test_fraction=0.25",
                                   f"paths.output_dir={tmp_path / 'folder_run'}"))
    assert accuracy is not None and 0.0 <= accuracy <= 1.0
    mean_ap = train(compose_train(*common, "data=landmarks", "task=metric_learning", "data.batch_size=8",
                                  "data.samples_per_class=4", "data.train.val_fraction=0.34",
                                  "data.train.test_fraction=0.34", f"paths.output_dir={tmp_path / 'landmark_run'}"))
    assert mean_ap is not None and 0.0 < mean_ap <= 1.0


def run_script(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def test_train_py_end_to_end_prints_the_result(tmp_path):
    result = run_script([*SMALL, f"hydra.run.dir={tmp_path}", "trainer.limit_train_batches=2"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "aggnets run finished" in result.stdout and "test/acc" in result.stdout
    assert f"tensorboard --logdir {tmp_path}" in result.stdout
    assert (tmp_path / "config.yaml").exists() and (tmp_path / ".hydra" / "overrides.yaml").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert f"test/acc                 {results['test/acc']:.4f}" in result.stdout


def test_bad_config_fails_before_training_with_the_key(tmp_path):
    result = run_script([f"hydra.run.dir={tmp_path}", "head.num_clusters=lots"], timeout=120)
    assert result.returncode != 0
    assert "head.num_clusters: expected int, got 'lots'" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_ddp_two_cpu_processes(tmp_path):
    # metric learning: its retrieval validation gathers the embeddings of both ranks (40 = the whole val set)
    result = run_script([*SMALL, f"hydra.run.dir={tmp_path}", "trainer=ddp", "trainer.accelerator=cpu",
                         "trainer.devices=2", "trainer.limit_train_batches=3", "trainer.max_epochs=1",
                         "experiment=motifs_metric_learning", "data.batch_size=16", "task.projection_dim=16"],
                        timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    checksums = set(re.findall(r"codebook checksum on rank \d: (\S+)", output))
    ranks = set(re.findall(r"codebook checksum on rank (\d)", output))
    assert ranks == {"0", "1"} and len(checksums) == 1, output[-3000:]
    assert output.count("aggnets run finished") == 1 and "test/mAP" in result.stdout
    assert re.search(r"val/queries +40\.0000", result.stdout) and re.search(r"test/queries +40\.0000", result.stdout)
    # one Hydra run directory, shared by both ranks (Lightning relaunches rank 1 into it)
    assert len(list(tmp_path.parent.glob(f"{tmp_path.name}*"))) == 1
    assert not (tmp_path / ".hydra" / "rank1").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_after_sigkill_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    """Deterministic CPU mode: kill -9 mid-epoch, resume from last.ckpt, and the run ends with the same weights and
    the same metrics as a run never interrupted (the loader skips the batches already seen and restores the RNGs)."""
    args = [*SMALL, "data.train.size=192", "trainer.max_epochs=2", "trainer.deterministic=true",
            "callbacks.last_checkpoint.every_n_train_steps=3", "callbacks.codebook_init.max_images=32"]
    whole = run_script([*args, f"hydra.run.dir={tmp_path / 'whole'}"], timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while not last.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert last.exists(), "no last.ckpt was written"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < killed_at["global_step"] < 24 and killed_at["global_step"] % 12, "not killed mid-epoch"

    resumed = run_script([*args, f"hydra.run.dir={run_dir}", f"ckpt_path={last}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert "aggnets run finished" in resumed.stdout
    assert "dataloader is not resumable" not in resumed.stdout + resumed.stderr
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 24 and final["epoch"] == 1
    expected, got = _state(tmp_path / "whole" / "checkpoints" / "last.ckpt"), _state(last)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    metrics_whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    metrics_resumed = json.loads((run_dir / "results.json").read_text())
    for key in ("test/acc", "test/loss", "val/acc"):
        assert metrics_resumed[key] == metrics_whole[key], key


def test_unwritable_output_dir_fails_at_start(tmp_path):
    from aggnets_train.config import ConfigError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    started = time.time()
    with pytest.raises(ConfigError, match=r"^paths\.output_dir: cannot write to .*a_file/run"):
        train(compose_train(*SMALL, f"paths.output_dir={blocker / 'run'}"))
    assert time.time() - started < 5  # before anything is built
    if os.geteuid() != 0:  # root writes anywhere: a read-only directory only stops other users
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot write"):
            train(compose_train(*SMALL, f"paths.output_dir={readonly}"))


def test_full_disk_fails_at_start_not_at_the_first_checkpoint(tmp_path, monkeypatch):
    import shutil

    from aggnets_train.config import ConfigError

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(ConfigError, match=r"^paths\.output_dir: only 10 MiB free .* need about \d+ MiB"):
        train(compose_train(*SMALL, f"paths.output_dir={tmp_path}"))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


VIT_SMALL = ["backbone=dinov2_vits14", "backbone.weights=null", "backbone.model_kwargs={embed_dim: 48, depth: 2, "
             "num_heads: 2}", "backbone.layer=-1", "backbone.freeze=blocks.0"]


@pytest.mark.parametrize("head", ["netvlad", "class_token"])
def test_a_dinov2_backbone_trains_with_a_head(tmp_path, head):
    """A DINOv2 ViT (random, tiny) with its last block trained: the codebook fitted on its patch tokens, the class
    token passed to the head that uses it, the assignment maps drawn over the patch grid."""
    overrides = [*SMALL, *VIT_SMALL, f"head={head}", f"paths.output_dir={tmp_path}", "trainer.limit_train_batches=3"]
    if head == "netvlad":
        overrides.append("head.num_clusters=8")
    metric = train(compose_train(*overrides))
    assert metric is not None and 0.0 <= metric <= 1.0
    tags = tensorboard_tags(tmp_path)
    assert "test/acc" in tags["scalars"]
    assert ("head/assignment_map" in tags["images"]) == (head == "netvlad")


@pytest.mark.parametrize("overrides", [["head=mixvpr"], ["head=convap"], ["head=cosplace", "task.context_gating=true"],
                                       ["head=crn", "head.num_clusters=8"],
                                       ["head=netvlad", "head.num_clusters=8", "head.ghost_clusters=2"],
                                       ["head=netvlad", "head.num_clusters=4", "head.ghost_clusters=1",
                                        "head.residual=false"]],
                         ids=["mixvpr", "convap", "cosplace+context_gating", "crn", "ghostvlad", "supervlad"])
def test_the_field_heads_train_on_the_embedded_default(tmp_path, overrides):
    """train.py's run with each head of issue 15 (MixVPR's in_h / in_w derived from the backbone and the image size;
    the codebook of CRN / GhostVLAD fitted first), a few steps, to a test accuracy."""
    metric = train(compose_train(*SMALL, *overrides, f"paths.output_dir={tmp_path}", "trainer.limit_train_batches=3"))
    assert metric is not None and 0.0 <= metric <= 1.0
    assert "test/acc" in tensorboard_tags(tmp_path)["scalars"]


@pytest.mark.parametrize("head", ["salad", "boq"])
def test_the_transformer_heads_train_on_a_dinov2_backbone(tmp_path, head):
    """python train.py backbone=dinov2_vitb14 head=salad / boq (random and tiny: two blocks of width 48): the class
    token reaches SALAD, a few steps train, and the heads' maps (SALAD's plan and dustbin share, BoQ's
    cross-attention) are drawn over the patch grid in TensorBoard."""
    vit = ["backbone=dinov2_vitb14", "backbone.weights=null",
           "backbone.model_kwargs={embed_dim: 48, depth: 2, num_heads: 2}", "backbone.layer=-1",
           "backbone.freeze=blocks.0"]
    small_head = {"salad": ["head.num_clusters=4", "head.cluster_dim=8", "head.token_dim=4", "head.hidden_dim=16"],
                  "boq": ["head.proj_channels=16", "head.num_queries=4", "head.row_dim=4", "head.num_heads=2"]}[head]
    metric = train(compose_train(*SMALL, *vit, f"head={head}", *small_head, f"paths.output_dir={tmp_path}",
                                 "trainer.limit_train_batches=3"))
    assert metric is not None and 0.0 <= metric <= 1.0
    maps = {"salad": {"head/assignment_map", "head/dustbin_map"}, "boq": {"head/cross_attention_map"}}[head]
    assert maps <= tensorboard_tags(tmp_path)["images"]
