"""The README and the local run, as a new user meets them: lines that work when pasted, one
setting for the local Redis port, every setting named in the configuration table."""

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from redis import Redis
from redis.exceptions import RedisError

from postbackproject.settings import BASE_DIR
from tests.conftest import free_port, http_answers, service_env, wait_until

README = (BASE_DIR / "README.md").read_text()


def shell_block_after(heading: str) -> list[str]:
    """The lines of the first ```sh block after a heading, comments dropped."""
    section = README[README.index(heading) :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, heading
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture
def local_checkout(tmp_path: Path) -> Path:
    """A folder laid out like a checkout after deploy/run-local.sh made var/local.env."""
    (tmp_path / "deploy").mkdir()
    for name in ("local-redis.sh", "redis.conf"):
        shutil.copy(BASE_DIR / "deploy" / name, tmp_path / "deploy" / name)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "local.env").write_text("REDIS_PASSWORD=pasted-secret\nREDIS_PORT=6380\n")
    (tmp_path / "var" / "redis-auth.conf").write_text("requirepass pasted-secret\n")
    return tmp_path


def start_local_redis(checkout: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["bash", str(checkout / "deploy" / "local-redis.sh")],
        env={**os.environ, "REDIS_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def answers() -> bool:
        try:
            return bool(Redis(port=port, password="pasted-secret", socket_timeout=1).ping())
        except RedisError:
            return False

    wait_until(answers, timeout=20, what="the local Redis")
    return process


def test_the_local_redis_listens_on_redis_port_with_the_password(local_checkout):
    port = free_port()
    redis = start_local_redis(local_checkout, port)

    redis.send_signal(signal.SIGTERM)
    assert redis.wait(timeout=20) == 0
    stderr = redis.stderr.read().decode() if redis.stderr else ""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "0":
        assert "memory overcommit; harmless for a local run" in stderr  # Redis's warning, explained
    assert (local_checkout / "var" / "redis").is_dir()


def test_the_readmes_troubleshooting_lines_work_when_pasted(local_checkout):
    port = free_port()
    redis = start_local_redis(local_checkout, port)
    try:
        lines = [line for line in shell_block_after("## Troubleshooting") if "redis" in line.lower()]
        assert lines and not any("-a " in line for line in lines)  # no password on command lines
        script = "\n".join(line.replace("-p 6380", f"-p {port}") for line in lines)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=local_checkout, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == "PONG"
    finally:
        redis.send_signal(signal.SIGTERM)
        redis.wait(timeout=20)


def settings_read_from_the_environment() -> set[str]:
    settings_source = (BASE_DIR / "postbackproject" / "settings.py").read_text()
    gunicorn_source = (BASE_DIR / "deploy" / "gunicorn.conf.py").read_text()
    names = set(re.findall(r'env\.\w+\("([A-Z_]+)"', settings_source))
    names |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', gunicorn_source))
    return names - {"GUNICORN_LOG_LEVEL", "GUNICORN_ACCESS_LOG"}  # gunicorn's own, documented there


def test_the_configuration_table_names_every_setting_the_service_reads():
    configuration = README[README.index("## Configuration") : README.index("## Troubleshooting")]
    missing = {name for name in settings_read_from_the_environment() if f"`{name}`" not in configuration}
    assert not missing


def test_the_readme_says_how_to_set_up_a_server_and_what_the_sample_does():
    assert "deploy/provision.sh postbacks.example.com" in README
    assert "The sample's host does not exist" in README


@pytest.mark.django_db(transaction=True)
def test_the_readmes_createsuperuser_line_works_without_a_terminal(tmp_path):
    [line] = [line for line in README.splitlines() if line.startswith("DJANGO_SUPERUSER_PASSWORD=")]
    assert "createsuperuser --noinput --username admin --email admin@example.com" in line
    password = re.search(r"DJANGO_SUPERUSER_PASSWORD='([^']+)'", line)
    assert password
    settings_file = tmp_path / "postback.env"
    settings_file.write_text("")  # deploy/manage.sh's settings: the suite's, from the environment

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=BASE_DIR,
        env=service_env(POSTBACK_ENV_FILE=str(settings_file)),
        stdin=subprocess.DEVNULL,  # no terminal, as in a script
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    admin = User.objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff and admin.email == "admin@example.com"
    assert admin.check_password(password.group(1))


@dataclass
class LocalRun:
    """deploy/local-processes.py, as deploy/run-local.sh ends: Redis, web and two workers."""

    process: subprocess.Popen[bytes]
    log: Path
    redis: Redis
    web_url: str

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def first(self, *words: str) -> int:
        """The index of the first line holding all these words."""
        return next(i for i, line in enumerate(self.lines()) if all(word in line for word in words))

    def last_of(self, name: str) -> int:
        """The index of the last line a process wrote itself."""
        return max(i for i, line in enumerate(self.lines()) if line[9:].startswith(f"{name:<8}|"))


@pytest.fixture
def local_run(tmp_path: Path) -> Iterator[LocalRun]:
    redis_port, web_port = free_port(), free_port()
    var = tmp_path / "var"  # local-redis.sh's POSTBACK_VAR_DIR: its password and data
    var.mkdir()
    (var / "redis-auth.conf").write_text("requirepass pasted-secret\n")
    env = service_env(
        REDIS_PORT=str(redis_port),
        POSTBACK_VAR_DIR=str(var),
        REDIS_URL=f"redis://:pasted-secret@127.0.0.1:{redis_port}/0",
        GUNICORN_BIND=f"127.0.0.1:{web_port}",
        WEB_CONCURRENCY="1",
        DELIVERY_STOP_GRACE_SECONDS="1",
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "deploy/local-processes.py"],
            cwd=BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as a shell gives a foreground job
        )
    run = LocalRun(process, log, Redis(port=redis_port, password="pasted-secret"), f"http://127.0.0.1:{web_port}")
    try:
        wait_until(lambda: http_answers(f"{run.web_url}/healthz"), timeout=60, what="the local run's web")
        wait_until(lambda: run.redis.scard("rq:workers") == 2, timeout=60, what="both workers registered")
        yield run
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def everything_stopped(run: LocalRun) -> bool:
    try:
        run.redis.ping()
    except RedisError:
        return not http_answers(f"{run.web_url}/healthz")
    return False


def test_ctrl_c_stops_web_then_the_workers_then_redis_last(local_run):
    os.killpg(local_run.process.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the terminal's foreground group

    assert local_run.process.wait(timeout=60) == 0, "\n".join(local_run.lines())
    web_gone = local_run.first("web ", "Shutting down: Master")
    for worker in ("worker1", "worker2"):
        assert web_gone < local_run.first(worker, "warm shut down requested")  # asked only once web had gone
    redis_asked = local_run.first("redis ", "Received SIGTERM")
    assert max(local_run.last_of("worker1"), local_run.last_of("worker2"), local_run.last_of("web")) < redis_asked
    assert local_run.last_of("redis") == local_run.first("redis ", "Redis is now ready to exit")
    assert everything_stopped(local_run)


def test_a_process_that_ends_on_its_own_stops_the_others_in_the_same_order(local_run):
    started = local_run.lines()[local_run.first("system", "worker1 started")]
    worker1 = int(started.rsplit("pid ", 1)[1].rstrip(")"))

    os.kill(worker1, signal.SIGKILL)

    assert local_run.process.wait(timeout=60) == 1
    said = "worker1 ended on its own (killed by SIGKILL): stopping the others"
    assert any(said in line for line in local_run.lines())
    web_gone = local_run.first("web ", "Shutting down: Master")
    assert web_gone < local_run.first("worker2", "warm shut down requested")
    assert local_run.last_of("worker2") < local_run.first("redis ", "Received SIGTERM")
    assert everything_stopped(local_run)
