"""Evaluate retrieval: query/positive pairs, revisited Oxford / Paris (E / M / H mAP, mP@k) or place recognition
(recall@N) with a trained or config-built model, optional whitening and query expansion (Hydra:
conf/evaluate.yaml). See ``python scripts/evaluate.py --help``."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from aggnets_train.retrieval_run import run_evaluate
    return run_evaluate(cfg)


if __name__ == "__main__":
    from aggnets_train.overrides import exit_on_unknown_keys
    exit_on_unknown_keys("evaluate")
    main()
