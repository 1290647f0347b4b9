#!/usr/bin/env bash
# Set everything up, then run the lab demo: a firewall pair in network namespaces,
# client traffic through the floating IPs, a Master crash, failback, switchover, the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hasync lab demo "$@"
