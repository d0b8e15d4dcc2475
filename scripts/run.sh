#!/usr/bin/env bash
# The main job: the training run (python train.py, Hydra). With no arguments it trains the embedded default
# (procedural motif images, EfficientNet-Lite0 + NetVLAD, about 1 min on a 2-core CPU); arguments are Hydra overrides,
# e.g. `bash scripts/run.sh experiment=fashion_mnist_netvlad`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
bash "$root/scripts/setup_data.sh"
cd "$root"
exec "${AGGNETS_VENV:-$root/.venv}/bin/python" train.py "$@"
