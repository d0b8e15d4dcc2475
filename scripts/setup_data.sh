#!/usr/bin/env bash
# Offline real data for the tests and baselines: Fashion-MNIST from Debian's `dataset-fashion-mnist` package and
# the sample photos of Debian's `opencv-doc` (/usr/share/doc/opencv-doc/examples/data, the real-photo retrieval
# set of scripts/opencv_retrieval_set.py); the EfficientNet-Lite0 weights come with pip, see setup_env.sh.
# Installs what is missing when apt-get is usable; otherwise says how (the real-data tests skip locally without
# them, and fail under CI=true).
set -euo pipefail

install_deb() {  # install_deb PACKAGE HINT
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package $1"
    (apt-get install -y -qq "$1" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$1" >/dev/null; }) \
      || echo "[setup] could not install $1"
  else
    echo "[setup] $2"
  fi
}

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  install_deb dataset-fashion-mnist \
    "Fashion-MNIST not found: 'sudo apt-get install dataset-fashion-mnist' or set FASHION_MNIST_DIR"
fi
if [ ! -f /usr/share/doc/opencv-doc/examples/data/graf1.png ]; then
  install_deb opencv-doc "opencv-doc sample photos not found: 'sudo apt-get install opencv-doc'"
fi
