#!/usr/bin/env bash
# Make sure Debian's chromium is installed for the end-to-end page test (Playwright drives it;
# Playwright's own browser download does not work on these machines).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v chromium >/dev/null; then
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq chromium >&2
fi
command -v chromium
