#!/usr/bin/env bash
# Installs everything duo-attn needs on Debian 12 (bookworm). Idempotent: safe to run again.
#  - Debian's Rust 1.96 (rustc-web, cargo-web) with the library source that -Zbuild-std=core needs
#  - libcuda1 from non-free, so host binaries link and start on machines without a GPU
#  - ptxas 13.0 from the nvidia-cuda-nvcc wheel (offline assembly, resource reports)
#  - cuobjdump and nvdisasm from their wheels (offline SASS: HGMMA/HMMA counts)
set -euo pipefail

TOOLS_DIR="${DUO_ATTN_TOOLS:-$HOME/.cache/duo-attn}"
NVCC_WHEEL_VERSION="13.0.88"
# The oldest cuobjdump/nvdisasm wheels on PyPI; they read ptxas 13.0's sm_90a cubins.
CUOBJDUMP_WHEEL_VERSION="13.2.51"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

say() { printf '[setup] %s\n' "$*"; }

if ! grep -qs "^ID=debian" /etc/os-release; then
  say "warning: this script targets Debian 12; continuing anyway"
fi

# Non-free component for libcuda1 (deb822 file, written once).
NONFREE=/etc/apt/sources.list.d/debian-nonfree.sources
if [ ! -f "$NONFREE" ]; then
  say "enabling Debian non-free component ($NONFREE)"
  $SUDO tee "$NONFREE" >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

PKGS=(rustc-web cargo-web rust-web-src rust-web-clippy rustfmt-web libcuda1)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  say "Debian packages present"
fi

if [ ! -d /usr/lib/rustlib/src/rust/library/core ]; then
  say "error: Rust library source missing at /usr/lib/rustlib/src/rust/library (package rust-web-src)"
  exit 1
fi

PTXAS="$TOOLS_DIR/nvcc/nvidia/cu13/bin/ptxas"
if [ ! -x "$PTXAS" ]; then
  say "installing ptxas from nvidia-cuda-nvcc==$NVCC_WHEEL_VERSION into $TOOLS_DIR/nvcc"
  mkdir -p "$TOOLS_DIR"
  python3 -m pip install -q --no-deps --disable-pip-version-check --root-user-action=ignore \
    --target "$TOOLS_DIR/nvcc" "nvidia-cuda-nvcc==$NVCC_WHEEL_VERSION"
  chmod +x "$TOOLS_DIR"/nvcc/nvidia/cu13/bin/* || true
else
  say "ptxas present"
fi
"$PTXAS" --version | tail -n 1

CUOBJDUMP="$TOOLS_DIR/cuobjdump/nvidia/cu13/bin/cuobjdump"
# cuobjdump -sass runs nvdisasm from its own directory: both wheels go into one target.
if [ ! -x "$CUOBJDUMP" ] || [ ! -x "$(dirname "$CUOBJDUMP")/nvdisasm" ]; then
  say "installing cuobjdump and nvdisasm $CUOBJDUMP_WHEEL_VERSION into $TOOLS_DIR/cuobjdump"
  python3 -m pip install -q --no-deps --disable-pip-version-check --root-user-action=ignore \
    --upgrade --target "$TOOLS_DIR/cuobjdump" \
    "nvidia-cuda-cuobjdump==$CUOBJDUMP_WHEEL_VERSION" "nvidia-cuda-nvdisasm==$CUOBJDUMP_WHEEL_VERSION"
  chmod +x "$TOOLS_DIR"/cuobjdump/nvidia/cu13/bin/* || true
else
  say "cuobjdump present"
fi
"$CUOBJDUMP" --version | tail -n 1

say "rustc: $(cd "$(dirname "$0")/.." && rustc -V)"
say "done"
