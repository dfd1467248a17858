#!/usr/bin/env bash
# Installs what building, running and testing Tandem needs, and nothing that is already there.
# Safe to run again: every step checks first. Needs root (or sudo) only for missing apt packages.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

# Debian packages: the C++ toolchain bindgen needs for librocksdb-sys later, sipp for the
# scripted SIP tests, baresip and linphone as the real phones of the black-box suite,
# Kamailio as a provider's registrar in the tests (and the reference peer of the
# benchmarks), iproute2 and nftables for the fault tests' network namespaces, faketime
# (libfaketime) to step a node's clock in the clock-jump test, and the small tools the
# tests and scripts call.
apt_packages=(clang libclang-dev sip-tester baresip-core linphone-cli kamailio iproute2 nftables
  faketime curl ca-certificates pkg-config python3)

missing=()
for p in "${apt_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { log "need root or sudo to install: ${missing[*]}"; exit 1; }
    sudo_cmd=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "Debian packages present"
fi

if ! command -v cargo >/dev/null; then
  log "cargo is not on PATH; install Rust with rustup (https://rustup.rs) and run this again"
  exit 1
fi

# cargo-nextest runs the test suite; install it only when missing.
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "ready"
