#!/usr/bin/env bash
# Installs (as root) or names (otherwise) the Debian packages a target needs.
# Usage: scripts/deps.sh build|demo|test|bench
set -euo pipefail

build_pkgs="cmake make gcc pkg-config libhiredis-dev libjansson-dev libpq-dev"
run_pkgs="redis-server python3 python3-celery python3-redis"
test_pkgs="libcmocka-dev python3-pytest"
# PostgreSQL for the db/ tasks: a private server (initdb), psycopg2 to check what landed; SQLAlchemy for the bench.
pg_pkgs="postgresql python3-psycopg2"
bench_pkgs="python3-sqlalchemy"

case "${1:-build}" in
  build) want="$build_pkgs" ;;
  demo)  want="$build_pkgs $run_pkgs" ;;
  test)  want="$build_pkgs $run_pkgs $test_pkgs $pg_pkgs" ;;
  bench) want="$build_pkgs $run_pkgs $pg_pkgs $bench_pkgs" ;;
  *) echo "usage: $0 build|demo|test|bench" >&2; exit 2 ;;
esac

missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "celeriac: missing Debian packages:$missing" >&2
  echo "install them with: sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "celeriac: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packaged redis-server service from starting on the default port: tests start their own.
apt-get install -y -qq $missing >/dev/null
