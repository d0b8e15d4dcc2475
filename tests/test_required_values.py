"""Every required value (???) in conf/ can be set from the command line as the README and the error messages say.

The override check that runs before Hydra (aggnets_train/overrides.py) once rejected exactly these keys
(``data.train.root: no key 'root' in data.train``): OmegaConf answers ``'root' in node`` with False for a missing
value. Here every ``???`` of every config (train / extract / evaluate) under every choice of every config group is
found by walking the composed config, and set through the check the entry points run on ``sys.argv``; then the
README's own commands run as subprocesses of the real scripts on tiny folders of images."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf

from aggnets_train.overrides import check_overrides, exit_on_unknown_keys
from tests.test_retrieval_scripts import write_images

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENTRY_POINTS = {"train": ROOT / "train.py", "extract": ROOT / "scripts" / "extract.py",
                "evaluate": ROOT / "scripts" / "evaluate.py"}


def _missing_keys(node, prefix=""):
    """Dotted keys of the ??? values below ``node`` (a value interpolated from a ??? is set through its source)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                if not OmegaConf.is_interpolation(node, key):
                    yield full
                continue
            if not OmegaConf.is_interpolation(node, key):
                yield from _missing_keys(node._get_node(key), full + ".")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _missing_keys(node._get_node(index), f"{prefix}{index}.")


def _compose(config: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def _choices(config: str) -> list[list[str]]:
    """The default composition and one per option of each group the config's defaults list names."""
    defaults = OmegaConf.load(CONF / f"{config}.yaml").defaults
    groups = [next(iter(entry)) for entry in defaults if isinstance(entry, DictConfig)]
    runs = [[]]
    for group in groups:
        runs += [[f"{group}={path.stem}"] for path in sorted((CONF / group).glob("*.yaml"))]
    return runs


def _required_values() -> list[tuple[str, list[str], str]]:
    found = []
    for config in ENTRY_POINTS:
        for choice in _choices(config):
            try:
                cfg = _compose(config, choice)
            except ConfigCompositionException:  # a training experiment (it sets data/, task/) under extract / evaluate
                if config == "train" or not choice[0].startswith("experiment="):
                    raise
                continue
            found += [(config, choice, key) for key in _missing_keys(cfg) if not key.startswith("hydra.")]
    return found


@pytest.fixture(scope="module")
def required():
    return _required_values()


def test_the_configs_do_have_required_values_to_set(required):
    keys = {(config, key) for config, _, key in required}
    assert {("train", "data.train.root"), ("train", "data.num_classes"), ("train", "head.in_channels"),
            ("extract", "images")} <= keys


@pytest.mark.parametrize("config", sorted(ENTRY_POINTS))
def test_every_required_value_is_accepted_by_the_override_check(config, required, monkeypatch):
    by_choice: dict[tuple[str, ...], list[str]] = {}
    for name, choice, key in required:
        if name == config:
            by_choice.setdefault(tuple(choice), []).append(f"{key}=1")
    assert by_choice
    for choice, settings in by_choice.items():
        args = [*choice, *settings]
        monkeypatch.setattr(sys, "argv", [str(ENTRY_POINTS[config]), *args])
        try:
            exit_on_unknown_keys(config)  # what the entry point runs first (check_overrides on sys.argv)
        except SystemExit:
            pytest.fail(f"the override check rejects {args}: {check_overrides(config, args)}")


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                            cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_py_on_a_folder_of_images_as_the_readme_says(tmp_path):
    for label in ("circles", "squares"):
        write_images(tmp_path / "data" / label, 4)
    _run(ENTRY_POINTS["train"], "data=image_folder", f"data.train.root={tmp_path / 'data'}", "data.num_classes=2",
         "backbone=resnet18", "backbone.weights=null", "head=gem", "data.batch_size=4", "data.num_workers=0",
         "data.train.image_size=32", "data.train.val_fraction=0.25", "data.train.test_fraction=0.25",
         "trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "trainer.enable_progress_bar=false", "logger=csv", "callbacks=none", f"paths.output_dir={tmp_path / 'run'}",
         cwd=tmp_path)
    assert (tmp_path / "run" / "results.json").is_file()


def test_extract_py_on_a_folder_of_images_as_the_readme_says(tmp_path):
    write_images(tmp_path / "photos", 3)
    result = _run(ENTRY_POINTS["extract"], f"images={tmp_path / 'photos'}", f"output={tmp_path / 'desc.npy'}",
                  "backbone=resnet18", "backbone.weights=null", "extraction.max_size=48",
                  f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert (tmp_path / "desc.npy").is_file() and "3 descriptors" in result.stdout
