#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup_env.sh, once) and runs the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k netvlad`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
bash "$root/scripts/setup_data.sh"
cd "$root"
exec "${AGGNETS_VENV:-$root/.venv}/bin/python" -m pytest tests "$@"
