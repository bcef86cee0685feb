#!/usr/bin/env bash
# Installs everything duo-attn needs on Debian 12 (bookworm). Idempotent: safe to run again.
#  - Debian's Rust 1.96 (rustc-web, cargo-web) with the library source that -Zbuild-std=core needs
#  - libcuda1 from non-free, so host binaries link and start on machines without a GPU
#  - ptxas 13.0 from the nvidia-cuda-nvcc wheel (offline assembly, resource reports)
set -euo pipefail

TOOLS_DIR="${DUO_ATTN_TOOLS:-$HOME/.cache/duo-attn}"
NVCC_WHEEL_VERSION="13.0.88"
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

say "rustc: $(cd "$(dirname "$0")/.." && rustc -V)"
say "done"
