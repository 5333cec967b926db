#!/usr/bin/env bash
# Builds celeriac for the runtime image: the one recipe the Dockerfile's build stage runs and CI runs on the
# host (tests/integration/test_docker.py), so it is exercised even where no Docker engine is available.
#
# Usage: docker/build.sh DESTDIR
#   Installs the build packages when they are missing (as root; scripts/deps.sh build), configures a Release
#   build with warnings as errors and without the unit tests in a temporary build directory, and installs
#   DESTDIR/bin/celeriac (stripped). The build directory is removed afterwards.
# Environment: JOBS (parallel compile jobs, default: number of cores), BUILD_DIR (keep the build there).
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 DESTDIR" >&2
  exit 2
fi
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="$1"
jobs="${JOBS:-$(nproc)}"

"$src/scripts/deps.sh" build

if [ -n "${BUILD_DIR:-}" ]; then
  build="$BUILD_DIR"
else
  build="$(mktemp -d "${TMPDIR:-/tmp}/celeriac-build.XXXXXX")"
  trap 'rm -rf "$build"' EXIT
fi

cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCELERIAC_TESTS=OFF -DCELERIAC_SANITIZE=OFF >/dev/null
cmake --build "$build" -j "$jobs" >/dev/null
install -D -m 0755 -s "$build/celeriac" "$dest/bin/celeriac"
"$dest/bin/celeriac" --version
