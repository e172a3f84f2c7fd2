#!/usr/bin/env bash
# The README's test command: every CPU tier (unit + contract + CPU-runnable slow tests); GPU tests skip cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m "not gpu" -p no:cacheprovider "$@"
