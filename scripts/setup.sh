#!/usr/bin/env bash
# Installs every Debian package victor's build, tests and built-in data need.
# Idempotent: packages already present are skipped by apt.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libgloo-dev libgoogle-glog-dev libopenblas0-openmp libdnnl-dev
  libsentencepiece-dev sentencepiece
  nlohmann-json3-dev libstb-dev libjpeg62-turbo-dev libcli11-dev libcpp-httplib-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  dataset-fashion-mnist gnuplot-nox
  python3-pil python3-numpy
  chromium clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages already installed"
else
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  echo "setup: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The server's client tests use the ecosystem's own code: the official `openai` npm package and
# puppeteer-core (driving Debian's chromium), pinned by tests/js/package-lock.json.
js="$(cd "$(dirname "$0")/.." && pwd)/tests/js"
if command -v npm >/dev/null; then
  if [ ! -d "$js/node_modules/openai" ] || [ ! -d "$js/node_modules/puppeteer-core" ]; then
    echo "setup: npm ci in tests/js"
    (cd "$js" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
  fi
else
  echo "setup: npm not found: the serve client tests (openai package, Chromium page) will be skipped"
fi
echo "setup: done"
