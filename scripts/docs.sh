#!/usr/bin/env bash
# Build the documentation (docs/ + the API reference from the docstrings) into site/, strictly: a broken reference
# or link fails. `bash scripts/docs.sh serve` serves it at http://127.0.0.1:8000 instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
if [ "${1:-build}" = serve ]; then
  NO_MKDOCS_2_WARNING=1 exec .venv/bin/python -m mkdocs serve
fi
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --quiet
echo "[docs] built site/ (open site/index.html)"
