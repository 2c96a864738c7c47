"""Numbers as people write them: settings and limits stored as floats are shown without a
trailing ".0" when they are whole (3600, not 3600.0), and keep their decimals when not."""

from typing import Any

from django.forms import NumberInput


def plain_number(value: float | int) -> str:
    """3600.0 -> "3600", 2.5 -> "2.5", 7 -> "7"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class PlainNumberInput(NumberInput):
    """A number field whose stored float shows as typed: "3600", not "3600.0"."""

    def format_value(self, value: Any) -> str | None:
        if isinstance(value, float):
            return plain_number(value)
        return super().format_value(value)
