"""`manage.py profilejob`: profile the next drain job that any worker starts."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from postbackproject.profiling import profile_next_job


class Command(BaseCommand):
    help = "Profile the next drain job with pyinstrument; its report goes to PROFILE_DIR."

    def handle(self, *args: Any, **options: Any) -> None:
        profile_next_job()
        self.stdout.write(
            f"The next drain job any worker starts will be profiled; its report (HTML and text) "
            f"will be in {settings.PROFILE_DIR} on that worker's machine."
        )
