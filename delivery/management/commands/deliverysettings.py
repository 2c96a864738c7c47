"""`manage.py deliverysettings [--set name=value ...]`: show or change the delivery settings."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.forms.models import model_to_dict

from delivery.forms import EDITABLE_FIELDS, DeliverySettingsForm
from delivery.models import DeliverySettings
from postbackproject.numbers import plain_number


def parse_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise CommandError(f"--set takes name=value, got {text!r}")
    if name not in EDITABLE_FIELDS:
        raise CommandError(f"unknown setting {name!r}; settings: {', '.join(EDITABLE_FIELDS)}")
    return name, value


def shown(value: object) -> str:
    """A setting as typed: numbers plainly (3600, 2.5), text quoted ('' shows an empty one;
    a choice shows its value, as --set takes it)."""
    return plain_number(value) if isinstance(value, int | float) else repr(str(value))


class Command(BaseCommand):
    help = "Print the runtime delivery settings, or change them with --set name=value."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="Change one setting (repeatable); validated as in the admin form.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        current = DeliverySettings.load()
        if options["set"]:
            current = self.apply(current, dict(parse_assignment(text) for text in options["set"]))
        for name in EDITABLE_FIELDS:
            self.stdout.write(f"{name} = {shown(getattr(current, name))}")

    def apply(self, current: DeliverySettings, changes: dict[str, str]) -> DeliverySettings:
        data = {**model_to_dict(current, fields=EDITABLE_FIELDS), **changes}
        form = DeliverySettingsForm(data=data, instance=current)
        if not form.is_valid():
            problems = "; ".join(
                f"{field}: {' '.join(str(e) for e in errors)}" for field, errors in form.errors.items()
            )
            raise CommandError(f"settings not changed: {problems}")
        return form.save()
