"""Train a backbone + pooling head under Lightning, configured by Hydra (conf/train.yaml).

    python train.py                                   # the embedded default: motifs, about 1 min on a 2-core CPU
    python train.py backbone=resnet50 backbone.layer=layer3 head=gem data=image_folder data.train.root=/data/x \
        data.num_classes=10
    python train.py experiment=fashion_mnist_netvlad  # a ready-made combination (conf/experiment/)
    python train.py -m hparams_search=motifs_netvlad  # a sweep (Hydra multirun)
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from aggnets_train.run import train  # after Hydra has parsed the command line (fast --help)
    return train(cfg)


if __name__ == "__main__":
    from aggnets_train.overrides import exit_on_unknown_keys
    exit_on_unknown_keys("train")  # a misspelt key: the valid keys and the closest one, before Hydra runs
    main()
