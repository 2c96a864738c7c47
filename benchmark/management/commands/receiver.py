"""`manage.py receiver`: a local receiver for trying the service (README, "Try it")."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from benchmark.echo import make_server


class Command(BaseCommand):
    help = "Answer 200 to every request, any method and path, and print each one on a line. Ctrl-C stops it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000; 0: any free one)")
        parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")

    def handle(self, *args: Any, **options: Any) -> None:
        address, port = options["address"], options["port"]
        try:
            server = make_server(address, port, self.print_line)
        except OSError as exc:  # the port taken, most often
            raise CommandError(f"cannot listen on {address}:{port}: {exc.strerror or exc}; try another --port") from exc
        try:
            bound = server.server_address[1]
            self.print_line(f"Receiving on http://{address}:{bound}/ : every request answered 200 and printed here.")
            server.serve_forever()
        except KeyboardInterrupt:
            self.print_line("Stopped.")
        finally:
            server.server_close()

    def print_line(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
