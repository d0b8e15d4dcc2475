#!/usr/bin/env bash
# The main job. Until training lands (issue "Training under Lightning"), it is the heads demo: every head built on a
# random feature map, with its output size and timing. Extra arguments go to the demo (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${AGGNETS_VENV:-$root/.venv}/bin/python" scripts/demo_heads.py "$@"
