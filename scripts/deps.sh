#!/usr/bin/env bash
# Installs (as root) or names (otherwise) the Debian packages a target needs.
# Usage: scripts/deps.sh build|demo|test|bench
set -euo pipefail

build_pkgs="cmake make gcc pkg-config libhiredis-dev libjansson-dev libpq-dev librabbitmq-dev"
run_pkgs="redis-server python3 python3-celery python3-redis"
test_pkgs="libcmocka-dev python3-pytest"
# RabbitMQ for the AMQP transport: tests and the benchmark start private nodes (tests/integration/servers.py).
rabbit_pkgs="rabbitmq-server"
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

case "${1:-build}" in test | bench) want="$want $rabbit_pkgs" ;; esac
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
# policy-rc.d keeps the packaged services (redis-server, rabbitmq-server, epmd) from starting on their default
# ports: tests start their own. Docker images ship one; where there is none, one is put there for the install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
# policy-rc.d keeps the packaged redis-server service from starting on the default port: tests start their own.
apt-get install -y -qq $missing >/dev/null
