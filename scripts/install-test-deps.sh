#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine (idempotent).
# The Rust toolchain itself comes with the machine (rustup).
set -euo pipefail

need_apt=()
for tool in sha256sum:coreutils python3:python3; do
  bin=${tool%%:*}; pkg=${tool##*:}
  command -v "$bin" >/dev/null 2>&1 || need_apt+=("$pkg")
done

if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
