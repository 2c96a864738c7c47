"""A real process that dies (os._exit, no cleanup) right after a given step, for crash tests.

    python tests/crashing.py worker STEP    the worker (`rqworker postbacks`), dying after STEP
    python tests/crashing.py ingest BODY    one ingest request, dying once it is in the inbox,
                                            before it has started a drainer for it

Production code has no crash hooks: this script wraps the real functions from outside.
"""

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import django

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
django.setup()

from django.core.management import call_command  # noqa: E402

from delivery import engine, settling  # noqa: E402
from postbackproject import inbox  # noqa: E402
from tests.lean_client import LeanPathClient  # noqa: E402


def die_after(owner: Any, name: str, when: Callable[[Any], bool] = lambda result: True) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if when(result):
            os._exit(9)
        return result

    setattr(owner, name, wrapper)


# The drainer's steps, in order: read entries, send, record, commit to Redis.
WORKER_STEPS: dict[str, Callable[[], None]] = {
    "read": lambda: die_after(engine.Engine, "add"),
    "send": lambda: die_after(engine.Engine, "step", when=bool),  # replies came back, nothing recorded
    "record": lambda: die_after(settling, "save_attempts"),
    "commit": lambda: die_after(settling.Settler, "_commit"),
}


def main() -> None:
    role, argument = sys.argv[1], sys.argv[2]
    if role == "worker":
        WORKER_STEPS[argument]()
        call_command("rqworker", "postbacks", "--with-scheduler")
    elif role == "ingest":
        inbox.start_drainer = lambda drainer: os._exit(9)  # dies between the script and the job
        LeanPathClient().generic("POST", "/ingest.php", argument.encode(), HTTP_HOST="localhost")
        sys.exit("the drainer was never started: the inbox already had one")


if __name__ == "__main__":
    main()
