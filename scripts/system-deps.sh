#!/usr/bin/env bash
# System packages the system tests use: Slurm (slurmctld, slurmd, munge) and Chromium.
# Installed with apt when running as root and missing; otherwise those tests skip with a reason.
set -uo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld slurmd slurm-client munge)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not root or no apt-get; tests that need ${need[*]} will skip"
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "system-deps: apt-get failed; tests that need ${need[*]} will skip"
