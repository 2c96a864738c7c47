#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys

from postbackproject.metricsdir import use_shared_metrics_dir


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "postbackproject.settings")
    use_shared_metrics_dir()  # before prometheus-client is imported: workers count where /metrics reads
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
