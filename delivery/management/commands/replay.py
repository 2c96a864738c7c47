"""`manage.py replay`: send failed postbacks again, by id, or all that failed in a time range
(optionally to one host, or to URLs with a prefix)."""

from argparse import ArgumentTypeError
from datetime import datetime, time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from delivery.replay import failed_between, replay, unknown_postbacks

# Unknown ids listed in the command's answer; more are counted.
LISTED_UNKNOWN = 20


def parse_time(text: str) -> datetime:
    """An ISO 8601 time with its zone, or a date (its midnight in TIME_ZONE). A bad one is
    refused by argparse with this message and the usage line, not a traceback."""
    try:
        day = parse_date(text)
        when = parse_datetime(text) if day is None else None
    except ValueError:  # well formed but impossible, e.g. 2026-02-30
        when = day = None
    if day is not None:
        return timezone.make_aware(datetime.combine(day, time()))
    if when is None or when.tzinfo is None:
        raise ArgumentTypeError(f"use an ISO 8601 time with its zone (2026-11-28T09:00Z) or a date; got {text!r}")
    return when


class Command(BaseCommand):
    help = (
        "Replay postbacks that failed for good: the ones named, or all that failed from --since "
        "(to --until, to --host, to URLs starting with --url-prefix). Postbacks delivered since are left alone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("postback_ids", nargs="*", metavar="POSTBACK_ID")
        parser.add_argument("--since", type=parse_time, help="replay every postback that failed at or after this time")
        parser.add_argument("--until", type=parse_time, help="with --since: ... and before this time")
        parser.add_argument("--host", default="", help="with --since: only postbacks to this host[:port]")
        parser.add_argument("--url-prefix", default="", help="with --since: only postbacks sent to URLs starting so")

    def handle(self, *args: Any, **options: Any) -> None:
        ids = set(options["postback_ids"])
        since, until = options["since"], options["until"]
        if since is not None:
            if until is not None and until <= since:
                raise CommandError("--until must be later than --since")
            ids |= failed_between(since, until, options["host"], options["url_prefix"])
        elif until is not None or options["host"] or options["url_prefix"]:
            raise CommandError("--until, --host and --url-prefix go with --since")
        elif not ids:
            raise CommandError("name postback ids, or use --since")
        unknown = unknown_postbacks(options["postback_ids"])
        queued = replay(ids - unknown)
        self.stdout.write(f"{queued} of {len(ids)} postbacks queued again{leftovers(len(ids) - queued, unknown)}")


def leftovers(not_queued: int, unknown: set[str]) -> str:
    """Why the rest were not queued: unknown ids (listed), or not failed for good."""
    parts = []
    if unknown:
        listed = ", ".join(sorted(unknown)[:LISTED_UNKNOWN])
        more = f" and {len(unknown) - LISTED_UNKNOWN} more" if len(unknown) > LISTED_UNKNOWN else ""
        parts.append(f"{len(unknown)} unknown, with no attempt on record: {listed}{more}")
    if not_queued > len(unknown):
        parts.append(f"{not_queued - len(unknown)} had not failed for good")
    return f"; {'; '.join(parts)}" if parts else ""
