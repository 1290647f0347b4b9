#!/usr/bin/env bash
# Install what hasync, its lab and its tests need: Debian packages and a venv in .venv.
# Idempotent; run as root (the lab builds network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the web page's end-to-end test drives it headless (Playwright, never `playwright install`)
DEBIAN_PACKAGES=(nftables conntrack iproute2 procps keepalived conntrackd chromium)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# the distribution's keepalived/conntrackd are only the benchmark's comparison: never start them as services
for svc in keepalived conntrackd; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "== installing hasync into .venv"
.venv/bin/python -m pip install -q -e '.[test]'
