"""A worker's start: the open-file limit that thousands of connections need."""

import subprocess
import sys

from delivery.worker import OTHER_DESCRIPTORS, descriptors_needed
from postbackproject.settings import BASE_DIR
from tests.conftest import service_env

# Runs the check in a process whose limits the test sets (they cannot be undone in-process).
_CHECK = """
import resource, sys
import django
django.setup()
from delivery.worker import ensure_descriptor_limit
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(ensure_descriptor_limit(int(sys.argv[3]), 2048), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def check_with_limits(soft: int, hard: int, concurrency: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHECK, str(soft), str(hard), str(concurrency)],
        capture_output=True,
        text=True,
        cwd=BASE_DIR,
        env=service_env(),
        timeout=60,
    )


def test_a_worker_needs_a_descriptor_per_connection_it_may_keep():
    assert descriptors_needed(1024, 2048) == 1024 + 2048 + OTHER_DESCRIPTORS


def test_a_low_soft_limit_is_raised_to_what_the_concurrency_needs():
    needed = descriptors_needed(1024, 2048)
    done = check_with_limits(soft=256, hard=needed + 100, concurrency=1024)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(needed), str(needed)]


def test_a_worker_refuses_to_start_when_the_hard_limit_is_too_low_and_says_what_to_do():
    done = subprocess.run(
        ["sh", "-c", f'ulimit -n 300 && exec "{sys.executable}" manage.py rqworker postbacks --with-scheduler'],
        capture_output=True,
        text=True,
        cwd=BASE_DIR,
        env=service_env(DELIVERY_CONCURRENCY="1024"),
        timeout=60,
    )

    assert done.returncode != 0
    assert "DELIVERY_CONCURRENCY=1024 and DELIVERY_IDLE_CONNECTIONS=2048 need up to" in done.stderr
    assert "LimitNOFILE" in done.stderr
