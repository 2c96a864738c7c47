"""The folder where every web and worker process keeps its metrics, so that /metrics adds up
all of them.

prometheus-client decides once, when it is first imported, whether a process counts in its own
memory or in files under PROMETHEUS_MULTIPROC_DIR that every process of the host shares. Counted
in memory, a worker's delivery counts never reach /metrics, which a web process answers. So the
entry points (manage.py, the WSGI module, gunicorn's config) call `use_shared_metrics_dir()`
before anything imports prometheus-client: without the variable, the processes of one checkout
share `var/metrics` in it. systemd and deploy/manage.sh set /run/postback/metrics; the local run
empties `var/metrics` when it starts.
"""

import logging
import os
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "var" / "metrics"

logger = logging.getLogger(__name__)


def use_shared_metrics_dir() -> Path | None:
    """Point prometheus-client at the shared folder (PROMETHEUS_MULTIPROC_DIR, else var/metrics),
    creating it if missing. Returns it; or, when it cannot be written, unsets the variable, warns,
    and returns None: the process then counts in its own memory rather than failing to start."""
    folder = Path(os.environ.get(VARIABLE) or DEFAULT_DIR)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
        problem = "" if writable else "it is not writable by this user"
    except OSError as exc:
        problem = f"it cannot be created ({exc})"
    if problem:
        os.environ.pop(VARIABLE, None)
        logger.warning(
            "metrics folder %s unusable: %s. This process (pid %d) counts its metrics in its own memory, "
            "and /metrics will not show them: set %s to a folder that web and workers can all write.",
            folder,
            problem,
            os.getpid(),
            VARIABLE,
        )
        return None
    os.environ[VARIABLE] = str(folder)
    return folder
