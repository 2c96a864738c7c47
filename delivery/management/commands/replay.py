"""`manage.py replay`: send failed postbacks again, by id, or all that failed in a time range
(optionally to one host, or to URLs with a prefix)."""

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_datetime

from delivery.replay import failed_between, replay


def parse_time(text: str) -> datetime:
    when = parse_datetime(text)
    if when is None or when.tzinfo is None:
        raise CommandError(f"times are ISO 8601 with their zone, e.g. 2026-11-28T09:00Z; got {text!r}")
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
        queued = replay(ids)
        self.stdout.write(f"{queued} of {len(ids)} postbacks queued again (the others had not failed for good)")
