# The two commands of the README's Quick start, plus the benchmark. CMake does the building.
PYTHON ?= /usr/bin/python3
JOBS ?= $(shell nproc)

.PHONY: all build demo test unit integration bench clean

all: build

build:
	@scripts/deps.sh build
	@cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCELERIAC_TESTS=OFF >/dev/null
	@cmake --build build -j $(JOBS)

# Main job: build, start a private redis-server when no broker is configured, run celeriac and a demo client.
# `make demo WEB=1`: the whole stack instead (redis, PostgreSQL, celeriac, a Python worker, the Flask demo
# page) on this machine, until Ctrl-C: the local equivalent of docker/docker-compose.yml.
demo: build
	@scripts/deps.sh $(if $(WEB),web,demo)
	@$(PYTHON) scripts/$(if $(WEB),stack,demo).py

# Every test: unit tests and integration tests, all against the ASan+UBSan build.
test:
	@scripts/deps.sh test
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCELERIAC_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan && ctest --output-on-failure -L unit
	@CELERIAC_BIN=build-asan/celeriac $(PYTHON) -m pytest -q tests/integration

# Four scripts, each comparing celeriac (this release build) with the stock worker in the same run.
bench: build
	@scripts/deps.sh bench
	@$(PYTHON) bench/run.py
	@CELERIAC_BIN=build/celeriac $(PYTHON) bench/workflows.py
	@CELERIAC_BIN=build/celeriac $(PYTHON) bench/pg.py
	@CELERIAC_BIN=build/celeriac $(PYTHON) bench/rabbitmq.py

clean:
	rm -rf build build-asan
