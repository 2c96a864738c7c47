"""`manage.py replay`: send failed postbacks again, by id, or all that failed in a time range
(optionally to one host, or to URLs with a prefix). Exits 3 when an id named is unknown."""

from argparse import ArgumentTypeError
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from delivery.replay import TIME_FORMATS, failed_between, parse_since, parse_until, replay, unknown_postbacks

# Unknown ids listed in the command's answer; more are counted.
LISTED_UNKNOWN = 20
# The exit status when ids named have no attempt on record (the known ones are still replayed):
# apart from 1 (any other error) and 2 (a bad command line), so that a script can tell.
EXIT_UNKNOWN_IDS = 3


def argument(parse: Callable[[str], datetime]) -> Callable[[str], datetime]:
    """The shared parser as an argparse type: a bad time is refused with its message and the
    usage line, not a traceback."""

    def parse_argument(text: str) -> datetime:
        try:
            return parse(text)
        except ValueError as exc:
            raise ArgumentTypeError(str(exc)) from exc

    return parse_argument


class Command(BaseCommand):
    help = (
        "Replay postbacks that failed for good: the ones named, or all that failed from --since "
        "(to --until, to --host, to URLs starting with --url-prefix). Postbacks delivered since are left alone. "
        f"Times: {TIME_FORMATS}; a date as --until means the end of that day. "
        f"Exits {EXIT_UNKNOWN_IDS} when an id named has no attempt on record (the others are replayed)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("postback_ids", nargs="*", metavar="POSTBACK_ID")
        parser.add_argument(
            "--since", type=argument(parse_since), help="replay every postback that failed at or after this time"
        )
        parser.add_argument(
            "--until", type=argument(parse_until), help="with --since: ... and before this time (a date: its end)"
        )
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
        if unknown:
            raise CommandError(f"unknown postback ids, {listed(unknown)}", returncode=EXIT_UNKNOWN_IDS)


def leftovers(not_queued: int, unknown: set[str]) -> str:
    """Why the rest were not queued: unknown ids (listed), or not failed for good."""
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} unknown, {listed(unknown)}")
    if not_queued > len(unknown):
        parts.append(f"{not_queued - len(unknown)} had not failed for good")
    return f"; {'; '.join(parts)}" if parts else ""


def listed(unknown: set[str]) -> str:
    names = ", ".join(sorted(unknown)[:LISTED_UNKNOWN])
    more = f" and {len(unknown) - LISTED_UNKNOWN} more" if len(unknown) > LISTED_UNKNOWN else ""
    return f"with no attempt on record: {names}{more}"
