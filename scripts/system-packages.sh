#!/usr/bin/env bash
# Debian packages the real-part tests use, installed when missing (`make test` calls this; needs root or sudo).
#   chromium            the report rendered in a headless browser (tests/test_report.py)
#   slurm-wlm, munge    a one-node Slurm cluster the tests start (tests/slurm_cluster.py, tests/test_slurm.py)
# One package per line in PACKAGES; the command each provides in COMMANDS (same order) says whether it is there.
set -euo pipefail
PACKAGES=(chromium slurm-wlm munge)
COMMANDS=(chromium slurmd munged)
missing=()
for i in "${!PACKAGES[@]}"; do
    command -v "${COMMANDS[$i]}" >/dev/null 2>&1 || missing+=("${PACKAGES[$i]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages for the tests: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
