#!/usr/bin/env bash
# Offline real data for the tests and baselines: Fashion-MNIST from Debian's `dataset-fashion-mnist` package
# (the EfficientNet-Lite0 weights come with pip, see setup_env.sh). Installs it when missing and apt-get is usable;
# otherwise says how (the real-data tests skip locally without it, and fail under CI=true).
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || [ -n "${FASHION_MNIST_DIR:-}" ]; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }) \
    || echo "[setup] could not install dataset-fashion-mnist"
else
  echo "[setup] Fashion-MNIST not found: 'sudo apt-get install dataset-fashion-mnist' or set FASHION_MNIST_DIR"
fi
