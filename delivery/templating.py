"""Turn a URL template and one data object into the URL to call."""

import re
from collections.abc import Mapping
from urllib.parse import quote

from postbackproject.postback import Scalar

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def scalar_text(value: Scalar) -> str | None:
    """A value as it goes into a URL: numbers as written, true/false; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def render_url(template: str, data: Mapping[str, Scalar], unmatched_default: str) -> str:
    """Replace every {name} in one pass with its value, percent-encoded as a whole.

    One pass means a value that itself contains "{other}" is never expanded again. A name the
    data object lacks, or sets to null, takes the admin's default value.
    """

    def substitute(match: re.Match[str]) -> str:
        text = scalar_text(data.get(match.group(1)))
        return quote(unmatched_default if text is None else text, safe="")

    return PLACEHOLDER.sub(substitute, template)
