"""Export a trained or config-built backbone + head to ONNX and check it with onnxruntime at two input sizes (Hydra:
conf/export.yaml, the same backbone/ and head/ groups as training). E.g.
``python scripts/export.py head=netvlad`` (writes outputs/model.onnx),
``python scripts/export.py checkpoint=path/to/run/checkpoints/last.ckpt output=outputs/trained.onnx`` or
``python scripts/export.py backbone=resnet18 backbone.weights=null head=netvlad output=netvlad.onnx``."""
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> float:
    import torch

    from aggnets.export import check_onnx, export_onnx, supports_dynamic_hw
    from aggnets_train.retrieval_run import build_embedder

    for name in ("onnx_ir", "onnxscript"):  # their optimisation passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    embedder, info = build_embedder(cfg)
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    size = tuple(cfg.size)
    path = export_onnx(embedder, cfg.output, example_size=size, dynamic_batch=cfg.dynamic_batch,
                       dynamic_hw=cfg.dynamic_hw, opset=cfg.opset, verify=False)
    dynamic_hw = cfg.dynamic_hw and supports_dynamic_hw(embedder)
    second = list(cfg.check_size)
    if not cfg.dynamic_batch:
        second[0] = size[0]
    if not dynamic_hw:
        second[2:] = size[2:]
    worst = 0.0
    for shape in (size, tuple(second)):
        diff = check_onnx(embedder, path, [torch.randn(shape)], atol=None)
        print(f"input {tuple(shape)}: max |onnxruntime - torch| = {diff:.3g}")
        worst = max(worst, diff)
    print(f"{path}: {type(embedder.head).__name__}, out_dim {embedder.out_dim}, dynamic batch {cfg.dynamic_batch}, "
          f"dynamic H x W {dynamic_hw}{'' if dynamic_hw or not cfg.dynamic_hw else ' (fixed for this head)'}")
    if worst > cfg.atol:
        raise SystemExit(f"ONNX output differs from PyTorch by {worst:.3g} > atol={cfg.atol}")
    return worst


if __name__ == "__main__":
    from aggnets_train.overrides import exit_on_unknown_keys
    exit_on_unknown_keys("export")
    main()
