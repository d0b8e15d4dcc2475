"""Extract global descriptors of a folder / list of images with a trained or config-built model (Hydra:
conf/extract.yaml, the same backbone/ and head/ groups as training). See ``python scripts/extract.py --help``."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> str:
    from aggnets_train.retrieval_run import run_extract
    return run_extract(cfg)


if __name__ == "__main__":
    from aggnets_train.overrides import exit_on_unknown_keys
    exit_on_unknown_keys("extract")
    main()
