"""`manage.py receiver`: a local receiver for trying the service (README, "Try it")."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from benchmark.echo import serve


class Command(BaseCommand):
    help = "Answer 200 to every request, any method and path, and print each one on a line. Ctrl-C stops it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
        parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")

    def handle(self, *args: Any, **options: Any) -> None:
        address, port = options["address"], options["port"]
        self.stdout.write(f"Receiving on http://{address}:{port}/ : every request answered 200 and printed here.")
        self.stdout.flush()
        try:
            serve(address, port, self.print_line)
        except KeyboardInterrupt:
            self.stdout.write("Stopped.")
        except OSError as exc:  # the port taken, most often
            raise CommandError(f"cannot listen on {address}:{port}: {exc.strerror or exc}; try another --port") from exc

    def print_line(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
