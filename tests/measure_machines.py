"""What a network between the hosts adds: `python -m tests.measure_machines` (as root), with
DATABASE_URL naming a scratch PostgreSQL database, which it migrates and fills:

    createdb -h 127.0.0.1 -U postgres machines
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/machines .venv/bin/python -m tests.measure_machines
    dropdb -h 127.0.0.1 -U postgres machines

The machines are tests/test_machines.py's; the figures are in docs/performance.md.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from django.core.management import call_command  # noqa: E402

from tests.test_machines import measure  # noqa: E402

if __name__ == "__main__":
    call_command("migrate", verbosity=0)
    measure()
