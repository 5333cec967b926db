#!/bin/bash
# The celeriac image's HEALTHCHECK: GET /healthz on celeriac's --http-port, which the worker's main loop
# answers itself (no answer: the loop is stuck). Uses bash's /dev/tcp because the slim image has no curl.
# Usage: healthcheck.sh [PORT]   (default: $CELERIAC_HTTP_PORT, else 8080). Exit 0 when the answer is 200.
port="${1:-${CELERIAC_HTTP_PORT:-8080}}"
exec 3<>"/dev/tcp/127.0.0.1/$port" || { echo "celeriac health: nothing listens on port $port" >&2; exit 1; }
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
if ! IFS= read -r -t 3 status <&3; then
  echo "celeriac health: no answer on port $port within 3 s" >&2
  exit 1
fi
status="${status%$'\r'}"
case "$status" in
  "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "celeriac health: $status" >&2
exit 1
