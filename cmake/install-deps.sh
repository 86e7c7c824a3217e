#!/usr/bin/env bash
# Installs the Debian 12 packages moa's build, tests, benchmarks and examples need. Checks first,
# so a second run does nothing. Run as root (or with sudo available).
set -euo pipefail

packages=(cmake make g++ pkg-config libeigen3-dev catch2 nlohmann-json3-dev libxxhash-dev libbenchmark-dev
          libsentencepiece-dev libcli11-dev libxml2-dev trans-de-en libreoffice-help-de libreoffice-help-en-us libdnnl-dev ocl-icd-opencl-dev libopenblas-dev
          clang-14 libfuzzer-14-dev libopenmpi-dev openmpi-bin)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root to install: ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
