"""The Hydra head configs: one per registered head, each instantiates into that head."""
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import aggnets
from aggnets.heads import PoolingHead

CONF = Path(__file__).resolve().parents[1] / "conf" / "head"


def test_every_registered_head_has_a_config():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == aggnets.list_heads()


@pytest.mark.parametrize("name", aggnets.list_heads())
def test_config_instantiates_the_registered_head(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.in_channels = 12
    for arg in aggnets.get_head_class(name).capabilities.size_args:  # ??? in the config: filled from the backbone
        assert OmegaConf.is_missing(cfg, arg)
        cfg[arg] = 5
    head = instantiate(cfg)
    assert type(head) is aggnets.get_head_class(name)
    assert isinstance(head, PoolingHead) and head.in_channels == 12


def test_missing_in_channels_is_reported():
    cfg = OmegaConf.load(CONF / "gem.yaml")
    with pytest.raises(Exception, match="in_channels"):
        instantiate(cfg)
