#!/usr/bin/env bash
# Installs (as root) or names (otherwise) the Debian packages a target needs.
# Usage: scripts/deps.sh build|demo|web|test|bench
set -euo pipefail

build_pkgs="cmake make gcc pkg-config libhiredis-dev libjansson-dev libpq-dev librabbitmq-dev"
run_pkgs="redis-server python3 python3-celery python3-redis"
test_pkgs="libcmocka-dev python3-pytest"
# RabbitMQ for the AMQP transport: tests and the benchmark start private nodes (tests/integration/servers.py).
rabbit_pkgs="rabbitmq-server"
# PostgreSQL for the db/ tasks: a private server (initdb), psycopg2 to check what landed; SQLAlchemy for the bench.
pg_pkgs="postgresql python3-psycopg2"
bench_pkgs="python3-sqlalchemy"
# The Flask demo (python_tasks/web, `make demo WEB=1`): Flask under gunicorn, SQLAlchemy on psycopg2.
web_pkgs="postgresql python3-psycopg2 python3-sqlalchemy python3-flask gunicorn"
# Its tests: the browser test drives Debian's chromium with playwright-core from npm (tests/browser), and
# docker-compose validates docker/docker-compose.yml. Installed without their recommends (docker.io, ...).
stack_test_pkgs="chromium docker-compose"

case "${1:-build}" in
  build) want="$build_pkgs" ;;
  demo)  want="$build_pkgs $run_pkgs" ;;
  web)   want="$build_pkgs $run_pkgs $web_pkgs" ;;
  test)  want="$build_pkgs $run_pkgs $test_pkgs $pg_pkgs $web_pkgs $stack_test_pkgs" ;;
  bench) want="$build_pkgs $run_pkgs $pg_pkgs $bench_pkgs" ;;
  *) echo "usage: $0 build|demo|web|test|bench" >&2; exit 2 ;;
esac

case "${1:-build}" in test | bench) want="$want $rabbit_pkgs" ;; esac
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# node and npm for the browser test: any install will do (e.g. NodeSource's nodejs, which includes npm).
if [ "${1:-build}" = test ] && { ! command -v node >/dev/null || ! command -v npm >/dev/null; }; then
  missing="$missing nodejs npm"
fi
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
norec="" plain=""
for p in $missing; do
  case " $stack_test_pkgs nodejs npm " in *" $p "*) norec="$norec $p" ;; *) plain="$plain $p" ;; esac
done
[ -z "$plain" ] || apt-get install -y -qq $plain >/dev/null
[ -z "$norec" ] || apt-get install -y -qq --no-install-recommends $norec >/dev/null
