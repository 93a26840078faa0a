#!/usr/bin/env bash
# `victor serve` checked by the ecosystem's own clients (tests/js): `openai` = the official openai
# npm package, `browser` = the web page in headless Chromium. Exit 77 (ctest: skipped) with the
# reason where node, the npm packages or Chromium are missing; scripts/setup.sh installs them.
set -u
VICTOR="$1"
MODE="$2"
JS="$(cd "$(dirname "$0")" && pwd)/js"
command -v node >/dev/null || { echo "SKIP: node is not installed (scripts/setup.sh installs it)"; exit 77; }
[ -d "$JS/node_modules/openai" ] && [ -d "$JS/node_modules/puppeteer-core" ] ||
  { echo "SKIP: npm packages missing in $JS (scripts/setup.sh runs npm ci there)"; exit 77; }
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ "$MODE" = browser ] && [ -z "$CHROMIUM" ]; then
  echo "SKIP: chromium is not installed (scripts/setup.sh installs Debian's chromium)"; exit 77
fi
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$VICTOR" init --preset tiny --registers 2 --summary-layers 2 --out "$work/m" >/dev/null || { echo "FAIL: init"; exit 1; }
"$VICTOR" data gridvqa --out "$work/g" --train-images 1 --test-images 1 >/dev/null || { echo "FAIL: gridvqa"; exit 1; }
img="$work/g/images/test_000000.png"
"$VICTOR" generate --model "$work/m" --image "$img" --prompt "How many bags are there?" --max-new-tokens 8 \
  > "$work/expected.txt" || { echo "FAIL: generate"; exit 1; }

"$VICTOR" serve --model "$work/m" --port 0 --threads 1 2> "$work/serve.log" &
server=$!
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's|.*on http://127.0.0.1:\([0-9]*\)/.*|\1|p' "$work/serve.log")
  [ -n "$port" ] && break
  kill -0 "$server" 2>/dev/null || { echo "FAIL: serve exited: $(cat "$work/serve.log")"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "FAIL: serve did not start: $(cat "$work/serve.log")"; exit 1; }

if [ "$MODE" = openai ]; then
  node "$JS/openai_client.mjs" "http://127.0.0.1:$port/v1" "$img" "$work/expected.txt"
else
  node "$JS/browser_page.mjs" "http://127.0.0.1:$port/" "$img" "$work/expected.txt" "${SCREENSHOT:-$work/page.png}" "$CHROMIUM"
fi
rc=$?
kill -TERM "$server"
wait "$server"
src=$?
server=""
[ $src -eq 0 ] || { echo "FAIL: serve exited $src on SIGTERM: $(tail -3 "$work/serve.log")"; exit 1; }
exit $rc
