"""`manage.py replay`: send failed postbacks again, by id or all that failed since a time."""

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_datetime

from delivery.models import DeliveryAttempt, Outcome
from delivery.replay import replay


def parse_since(text: str) -> datetime:
    when = parse_datetime(text)
    if when is None or when.tzinfo is None:
        raise CommandError(f"--since takes an ISO 8601 time with its zone, e.g. 2026-11-28T09:00Z; got {text!r}")
    return when


class Command(BaseCommand):
    help = "Replay postbacks that failed for good: the ones named, or all that failed since --since."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("postback_ids", nargs="*", metavar="POSTBACK_ID")
        parser.add_argument("--since", type=parse_since, help="replay every postback that failed at or after this time")
        parser.add_argument("--url-prefix", default="", help="with --since: only postbacks sent to URLs starting so")

    def handle(self, *args: Any, **options: Any) -> None:
        ids: list[str] = list(options["postback_ids"])
        if options["since"] is not None:
            failed = DeliveryAttempt.objects.filter(
                outcome=Outcome.FAILED, delivered_at__gte=options["since"], url__startswith=options["url_prefix"]
            )
            ids.extend(failed.values_list("postback_id", flat=True).distinct())
        elif options["url_prefix"]:
            raise CommandError("--url-prefix goes with --since")
        if not ids:
            raise CommandError("name postback ids, or use --since")
        queued = replay(ids)
        self.stdout.write(f"{queued} of {len(set(ids))} postbacks queued again (the others had not failed for good)")
