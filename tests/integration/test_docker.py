"""docker/: what can be checked without a Docker engine.

- docker/build.sh, the script the image's build stage runs, builds a working binary here from the build
  context as Docker would send it (the tree minus .dockerignore), and the libraries that binary needs are
  exactly what the slim runtime stage installs (docker/runtime-packages.txt);
- the Dockerfiles run as a non-root user, and the HEALTHCHECK script answers for a running celeriac (and not
  for a dead port);
- `docker-compose config` (Debian's docker-compose) accepts docker/docker-compose.yml, whose services are
  configured through environment variables only, wait for each other's health, and leave celeriac scalable.
"""
import fnmatch
import os
import re
import shutil
import subprocess

import pytest

from servers import REPO, Celeriac, free_port

DOCKER = os.path.join(REPO, "docker")
COMPOSE = os.path.join(DOCKER, "docker-compose.yml")


def read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def dockerfile_stages(text):
    """[(base image, [instruction lines])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line.split()[1], []))
        else:
            stages[-1][1].append(line)
    return stages


def dockerignore_patterns():
    pats = [line.strip() for line in read(".dockerignore").splitlines()
            if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in pats), "docker_context() does not handle '!' patterns"
    return pats


def docker_ignored(rel, patterns):
    """Whether .dockerignore leaves rel (a path relative to the context) out: a pattern matches the path or one
    of its parent folders; a leading **/ matches at any depth."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        pat = pat.strip("/")
        for pre in prefixes:
            if fnmatch.fnmatchcase(pre, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatchcase(pre.rsplit("/", 1)[-1], pat[3:]):
                return True
    return False


def docker_context(dest):
    """Copies what `docker build .` would send from the repository (the working tree minus .dockerignore)."""
    patterns = dockerignore_patterns()
    for root, dirs, files in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not docker_ignored(rel_root + d, patterns)]
        for f in files:
            if not docker_ignored(rel_root + f, patterns):
                os.makedirs(os.path.join(dest, rel_root), exist_ok=True)
                shutil.copy2(os.path.join(root, f), os.path.join(dest, rel_root, f), follow_symlinks=False)
    return dest


def needed_packages(binary):
    """The Debian packages holding the shared libraries binary links directly (DT_NEEDED)."""
    dyn = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    pkgs = {}
    for lib in needed:
        path = os.path.realpath(paths[lib])
        owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        if owner.returncode != 0:  # merged /usr: dpkg may know it under /lib
            owner = subprocess.run(["dpkg", "-S", re.sub(r"^/usr/lib/", "/lib/", path)], capture_output=True,
                                   text=True, check=True)
        pkgs[lib] = owner.stdout.split(":")[0]
    return pkgs


# -- the image recipe ---------------------------------------------------------------------------------------

def test_dockerignore_matching():
    pats = dockerignore_patterns()
    assert docker_ignored("build-asan/celeriac", pats) and docker_ignored("tests/browser/node_modules/x", pats)
    assert docker_ignored("python_tasks/web/__pycache__/db.cpython-311.pyc", pats)
    assert not docker_ignored("python_tasks/web/db.py", pats) and not docker_ignored("worker/main.c", pats)


def test_build_script_builds_the_image_binary_from_the_docker_context(tmp_path):
    """The build stage's steps on this machine: the context as Docker would send it, then docker/build.sh."""
    ctx = docker_context(str(tmp_path / "src"))
    assert not os.path.exists(os.path.join(ctx, "tests")) and not os.path.exists(os.path.join(ctx, "build"))
    r = subprocess.run([os.path.join(ctx, "docker", "build.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, env=dict(os.environ, JOBS=os.environ.get("JOBS", "2")), timeout=600)
    assert r.returncode == 0, f"docker/build.sh failed:\n{r.stdout}\n{r.stderr}"
    binary = tmp_path / "out" / "bin" / "celeriac"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    assert version.returncode == 0 and re.fullmatch(r"celeriac \d+\.\d+\.\d+\n", version.stdout), version
    assert version.stdout == Celeriac.run(["--version"]).stdout  # the same release as the binary under test
    sections = subprocess.run(["readelf", "-S", binary], capture_output=True, text=True, check=True).stdout
    assert ".symtab" not in sections, "the image's binary should be stripped"
    # The runtime stage installs exactly the packages of the libraries the binary links (libc6 is in the base),
    # plus libpq5, which db/pq.c loads by its soname on a worker's first database task.
    runtime = set(read("docker", "runtime-packages.txt").split())
    pkgs = needed_packages(str(binary))
    assert b"libpq.so.5" in binary.read_bytes()
    assert set(pkgs.values()) - {"libc6"} | {"libpq5"} == runtime, pkgs
    # The build directory is temporary: nothing else is left in the destination.
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["bin", "celeriac"]


def test_build_script_usage():
    r = subprocess.run([os.path.join(DOCKER, "build.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_celeriac_dockerfile_is_multi_stage_slim_and_non_root():
    stages = dockerfile_stages(read("docker", "Dockerfile"))
    assert [base for base, _ in stages] == ["debian:bookworm", "debian:bookworm-slim"]
    build, run = (lines for _, lines in stages)
    # The build stage is: the context (as test_build_script_... copies it), then build.sh.
    assert build[-2:] == ["COPY . /src", "RUN /src/docker/build.sh /out"], build
    # The runtime stage: only the runtime libraries, without recommends; no compiler; a non-root user.
    text = " ".join(run)
    assert "xargs -a /tmp/runtime-packages.txt apt-get install -y --no-install-recommends" in text
    assert not re.search(r"\b(gcc|cmake|-dev)\b", text)
    assert "COPY --from=0 /out/bin/celeriac" in text or "COPY --from=build /out/bin/celeriac" in text
    user = [line for line in run if line.startswith("USER ")]
    assert user and not re.match(r"USER (root|0)\b", user[-1])
    health = [line for line in run if line.startswith("HEALTHCHECK ")]
    assert health and health[0].endswith('CMD ["celeriac-healthcheck"]')
    assert "COPY docker/healthcheck.sh /usr/local/bin/celeriac-healthcheck" in run
    cmd = [line for line in run if line.startswith("CMD ")][-1]
    assert '"--http-port", "8080"' in cmd and "ENV CELERIAC_HTTP_PORT=8080" in run


def test_python_dockerfile_installs_what_the_web_app_and_worker_import():
    stages = dockerfile_stages(read("docker", "Dockerfile.python"))
    assert [base for base, _ in stages] == ["debian:bookworm-slim"]
    lines = stages[0][1]
    text = " ".join(lines)
    deps = read("scripts", "deps.sh")
    web_pkgs = set(re.search(r'^web_pkgs="([^"]*)"', deps, re.M).group(1).split()) - {"postgresql"}
    run_pkgs = set(re.search(r'^run_pkgs="([^"]*)"', deps, re.M).group(1).split()) - {"redis-server"}
    for pkg in sorted(web_pkgs | run_pkgs):
        assert re.search(rf"\s{re.escape(pkg)}(\s|$)", text), f"docker/Dockerfile.python does not install {pkg}"
    assert "COPY python_tasks /app/python_tasks" in lines
    assert any(line.startswith("USER ") and not line.startswith("USER root") for line in lines)
    assert any(line.startswith("HEALTHCHECK ") and "/healthz" in line for line in lines)
    assert "python_tasks.web.wsgi:app" in [line for line in lines if line.startswith("CMD ")][-1]


def test_healthcheck_script_against_a_running_celeriac(workers):
    script = os.path.join(DOCKER, "healthcheck.sh")
    port = free_port()
    workers.celeriac("-c", "1", "--http-port", port, "--http-bind", "127.0.0.1")
    ok = subprocess.run([script, str(port)], capture_output=True, text=True, timeout=10)
    assert ok.returncode == 0, ok.stderr
    by_env = subprocess.run([script], capture_output=True, text=True, timeout=10,
                            env=dict(os.environ, CELERIAC_HTTP_PORT=str(port)))
    assert by_env.returncode == 0, by_env.stderr
    dead = subprocess.run([script, str(free_port())], capture_output=True, text=True, timeout=10)
    assert dead.returncode == 1 and "nothing listens" in dead.stderr


# -- the compose file ---------------------------------------------------------------------------------------

SERVICES = {"redis", "postgres", "web", "worker-python", "celeriac", "flower"}
# Configuration is environment variables with Celery's names, plus the PostgreSQL tasks' and the demo's own.
ALLOWED_ENV = {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL", "CELERIAC_PG_TABLES",
               "CELERIAC_NATIVE_QUEUE", "CELERIAC_PYTHON_QUEUE", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


@pytest.fixture(scope="module")
def compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (Debian package docker-compose; `scripts/deps.sh test` "
                    "installs it)", pytrace=False)
    import yaml  # python3-yaml: a dependency of docker-compose

    env = {k: v for k, v in os.environ.items() if k not in ("WEB_PORT", "FLOWER_PORT", "POSTGRES_PASSWORD")}
    r = subprocess.run([exe, "-f", COMPOSE, "config"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, f"docker-compose config refused docker/docker-compose.yml:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def test_compose_services_and_health(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name in SERVICES - {"celeriac"}:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert services["celeriac"]["healthcheck"]["test"] == ["CMD", "celeriac-healthcheck"]
    healthy = {"condition": "service_healthy"}
    for name in ("celeriac", "worker-python", "web"):
        deps = services[name]["depends_on"]
        assert deps["redis"] == healthy and deps["postgres"] == healthy, (name, deps)
    assert services["web"]["depends_on"]["celeriac"] == healthy
    assert services["flower"]["depends_on"]["redis"] == healthy


def test_compose_celeriac_is_scalable(compose):
    celeriac = compose["services"]["celeriac"]
    assert "container_name" not in celeriac and "ports" not in celeriac and "hostname" not in celeriac
    assert celeriac["build"]["dockerfile"] == "docker/Dockerfile"
    assert os.path.realpath(celeriac["build"]["context"]) == os.path.realpath(REPO)
    assert compose["services"]["worker-python"]["build"]["dockerfile"] == "docker/Dockerfile.python"


def test_compose_configuration_is_environment_only(compose):
    services = compose["services"]
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert set(env) <= ALLOWED_ENV, (name, set(env) - ALLOWED_ENV)
        assert not svc.get("env_file") and not svc.get("configs") and not svc.get("secrets"), name
        if name != "postgres":  # only PostgreSQL keeps data (a named volume); nobody mounts configuration
            assert not svc.get("volumes"), name
    for name in ("celeriac", "worker-python", "web"):
        env = services[name]["environment"]
        assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0"
        assert env["CELERY_RESULT_BACKEND"] == "redis://redis:6379/1"
        assert env["DATABASE_URL"] == "postgresql://celeriac:celeriac@postgres:5432/celeriac"
        assert env["CELERIAC_PG_TABLES"] == "demo_rows"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    # The queues the app routes to are the ones the workers consume.
    assert "command" not in services["celeriac"]  # the image's CMD: worker -Q native ...
    assert re.search(r'^CMD \["worker", "-Q", "native"', read("docker", "Dockerfile"), re.M)
    assert services["worker-python"]["command"][services["worker-python"]["command"].index("-Q") + 1] == "python"


def test_compose_fails_loudly_on_a_broken_file(tmp_path):
    """The check above means something: docker-compose does refuse a wrong file."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(read("docker", "docker-compose.yml").replace("condition: service_healthy",
                                                                "condition: service_sleepy", 1))
    r = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f", str(bad), "config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "service_sleepy" in r.stderr
