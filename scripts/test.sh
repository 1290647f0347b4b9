#!/usr/bin/env bash
# Set everything up, then run the whole test suite: unit tests and end-to-end tests
# against the real kernel in network namespaces (root needed). Benchmarks are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
