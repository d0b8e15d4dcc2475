"""Files from elsewhere never run code: every loader of checkpoints, weights, whitening and descriptor files uses
``torch.load(weights_only=True)``, so a malicious pickle is refused before its payload runs; config interpolation has
no resolver that evaluates code; a run config shipped with a checkpoint can only build aggnets objects."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, UnsupportedInterpolationType

from aggnets.backbones.factory import load_weights_file
from aggnets.retrieval import load_descriptors, load_whitening

from .test_training import SMALL, compose_train


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: the marker file exists only if the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _malicious_checkpoint(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"ran-{name}"
    path = tmp_path / name
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_the_payload_would_run_with_plain_pickle(tmp_path):
    """The test file is really malicious: a full unpickle runs it."""
    path, marker = _malicious_checkpoint(tmp_path, "evil.pt")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", ["weights", "whitening", "descriptors"])
def test_library_loaders_refuse_a_malicious_pickle(tmp_path, loader):
    path, marker = _malicious_checkpoint(tmp_path, "evil.pt")
    # the whitening loader re-raises as ValueError naming the argument, with torch's message
    with pytest.raises((pickle.UnpicklingError, ValueError), match="Weights only load failed"):
        if loader == "weights":
            load_weights_file(torch.nn.Linear(2, 1), str(path))
        elif loader == "whitening":
            load_whitening(path)
        else:
            load_descriptors(path)
    assert not marker.exists()


def test_training_resume_refuses_a_malicious_checkpoint(tmp_path):
    from aggnets_train.run import train

    path, marker = _malicious_checkpoint(tmp_path, "last.ckpt")
    cfg = compose_train(*SMALL, f"paths.output_dir={tmp_path / 'run'}", "head=gem", f"ckpt_path={path}",
                        "callbacks.codebook_init.enabled=false")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(cfg)
    assert not marker.exists()


def test_retrieval_checkpoint_refuses_a_malicious_checkpoint(tmp_path):
    from aggnets_train.retrieval_run import build_embedder

    path, marker = _malicious_checkpoint(tmp_path, "model.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        build_embedder(OmegaConf.create({"checkpoint": str(path)}))
    assert not marker.exists()


def test_a_shipped_run_config_can_only_build_aggnets_objects(tmp_path):
    from aggnets_train.config import ConfigError
    from aggnets_train.retrieval_run import build_embedder

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 0}, run / "checkpoints" / "last.ckpt")
    cfg = compose_train("head=gem")
    cfg.backbone = OmegaConf.create({"_target_": "pathlib.Path.touch", "self": str(marker)})
    OmegaConf.save(cfg, run / "config.yaml")
    with pytest.raises(ConfigError, match=r"backbone\._target_: 'pathlib\.Path\.touch' .* not an aggnets callable"):
        build_embedder(OmegaConf.create({"checkpoint": str(run / "checkpoints" / "last.ckpt")}))
    assert not marker.exists()


def test_config_interpolation_cannot_evaluate_code(tmp_path):
    marker = tmp_path / "ran"
    attempts = [f"${{eval:'open(\"{marker}\", \"w\")'}}", f"${{python:open('{marker}', 'w')}}",
                f"${{exec:open('{marker}','w')}}"]
    for attempt in attempts:
        cfg = compose_train()
        with pytest.raises((UnsupportedInterpolationType, GrammarParseError)):  # never an evaluation
            with open_dict(cfg):
                cfg.attack = attempt  # an invalid expression is refused here already
            _ = cfg.attack
    # the resolvers a composed config can use: Hydra's and OmegaConf's built-ins, none evaluates code
    from omegaconf.basecontainer import BaseContainer
    resolvers = set(BaseContainer._resolvers)
    assert resolvers <= {"now", "hydra", "oc.env", "oc.decode", "oc.create", "oc.deprecated", "oc.select",
                         "oc.dict.keys", "oc.dict.values", "python_version"}, resolvers
    # oc.decode parses OmegaConf literals only: a Python expression is a parse error, not an evaluation
    cfg = OmegaConf.create({"x": "${oc.decode:'__import__(\"os\").getcwd()'}", "y": "${oc.decode:'[1, 2]'}"})
    assert list(cfg.y) == [1, 2]
    with pytest.raises(InterpolationResolutionError, match="GrammarParseError"):
        _ = cfg.x
    assert not marker.exists() and os.getcwd()
