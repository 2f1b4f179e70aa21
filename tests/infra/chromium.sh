#!/usr/bin/env bash
# Headless Chromium for the report test (report.html opened in a real browser): Debian's `chromium`.
#
#   bash tests/infra/chromium.sh          # install if needed, check it renders headless, print its path
#   bash tests/infra/chromium.sh status   # exit 0 if a working chromium is installed
#   bash tests/infra/chromium.sh stop     # nothing to stop: each test starts and ends its own browser
#
# Tests read GREENSTACK_TEST_CHROMIUM (the last line printed), e.g. /usr/bin/chromium.
set -euo pipefail
BIN=${CHROMIUM_BIN:-/usr/bin/chromium}
FLAGS=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --disable-dev-shm-usage)

check() {
  local profile out
  profile=$(mktemp -d /tmp/greenstack-chromium.XXXXXX)
  out=$(timeout 90 "$BIN" "${FLAGS[@]}" --user-data-dir="$profile" \
        --dump-dom 'data:text/html,<p id=ok>greenstack-ok</p>' 2>/dev/null) || true
  rm -rf "$profile"
  [[ "$out" == *greenstack-ok* ]]
}

case "${1:-start}" in
  stop) exit 0 ;;
  status) if [ -x "$BIN" ] && check; then echo "chromium works: $BIN"; exit 0; else echo "no working chromium"; exit 1; fi ;;
  start) ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac

if [ ! -x "$BIN" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
check || { echo "chromium.sh: $BIN does not render headless" >&2; exit 1; }
echo "chromium works headless: $("$BIN" --version 2>/dev/null || echo "$BIN")"
echo "GREENSTACK_TEST_CHROMIUM=$BIN"
