"""The one validation of delivery settings, shared by admin and the command line; the replay
page's form, which reads times as `manage.py replay` does."""

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django import forms
from django.conf import settings

from delivery.models import OVERRIDE_FIELDS, DeliverySettings, Destination, SigningSecret, normalised_host
from delivery.replay import parse_since, parse_until
from postbackproject.headers import templates_of

EDITABLE_FIELDS = [
    "max_attempts",
    "backoff_base_seconds",
    "backoff_factor",
    "backoff_max_seconds",
    "unmatched_default",
    "max_url_bytes",
    "connect_timeout_seconds",
    "read_timeout_seconds",
    "total_timeout_seconds",
    "response_body_max_bytes",
    "store_response_body",
    "batch_size",
    "max_in_flight_per_host",
    "circuit_failure_threshold",
    "circuit_open_seconds",
    "sign_postbacks",
    "send_traceparent",
]


class DeliverySettingsForm(forms.ModelForm[DeliverySettings]):
    class Meta:
        model = DeliverySettings
        fields = EDITABLE_FIELDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Form fields strip whitespace by default; an admin may mean a space.
        self.fields["unmatched_default"].strip = False  # type: ignore[attr-defined]

    def clean_sign_postbacks(self) -> bool:
        """Signing is on only with a secret to sign with: a receiver that checks signatures
        would refuse every unsigned postback."""
        sign: bool = self.cleaned_data["sign_postbacks"]
        if sign and not SigningSecret.objects.filter(active=True).exists():
            raise forms.ValidationError(
                "Signing needs an active signing secret: add one under Delivery > Signing secrets first."
            )
        return sign


class SigningSecretForm(forms.ModelForm[SigningSecret]):
    """A secret's label and state; the secret itself is generated, never typed in."""

    class Meta:
        model = SigningSecret
        fields = ["label", "active"]

    def clean_active(self) -> bool:
        active: bool = self.cleaned_data["active"]
        others = SigningSecret.objects.filter(active=True).exclude(pk=self.instance.pk)
        if active and others.count() >= SigningSecret.MAX_ACTIVE:
            raise forms.ValidationError(
                f"At most {SigningSecret.MAX_ACTIVE} signing secrets can be active at once. Deactivate the "
                "old one once receivers have the new one, then add or activate another."
            )
        # (The instance still holds the stored values here: fields are copied onto it after.)
        was_active = self.instance.pk is not None and self.instance.active
        if was_active and not active and not others.exists() and DeliverySettings.load().sign_postbacks:
            raise forms.ValidationError(
                "This is the last active secret and postbacks are signed: add another secret first, "
                "or turn off sign_postbacks under Delivery > Delivery settings."
            )
        return active


# What the headers box shows in place of a saved value, which it never shows.
SET = "(set)"


class DestinationForm(forms.ModelForm[Destination]):
    """A destination's rules. Its extra headers are typed as `Name: value` lines; a saved
    value is never shown again (the line reads `Name: (set)`), and a line left so, or with
    its value blank, keeps it."""

    header_lines = forms.CharField(
        label="Extra headers",
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off", "spellcheck": "false"}),
        help_text=f"One `Name: value` a line, e.g. `Authorization: Bearer abc`. Saved values are never "
        f"shown: `Name: {SET}` or `Name:` keeps the saved value, a new value replaces it, and a line "
        "removed removes the header. The rules of senders' headers apply (no Host, Content-Length, "
        "X-Postback-*, webhook-*, ...).",
    )

    class Meta:
        model = Destination
        fields = [  # never "headers": its values are not shown once saved
            "name",
            "host",
            "url_prefix",
            "paused",
            "rate_per_second",
            "rate_burst",
            *OVERRIDE_FIELDS,
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial["header_lines"] = "\n".join(f"{name}: {SET}" for name, _ in self.instance.header_pairs)

    def clean_host(self) -> str:
        host = normalised_host(self.cleaned_data["host"])
        if not host:
            raise forms.ValidationError("Give a host, e.g. api.example.com or 10.0.0.5:8080.")
        return host

    def clean_url_prefix(self) -> str:
        prefix: str = self.cleaned_data["url_prefix"]
        if prefix and not prefix.startswith(("/", "?")):
            raise forms.ValidationError('A prefix is the start of a URL\'s path: it begins with "/".')
        return prefix

    def clean_header_lines(self) -> list[list[str]]:
        saved = {name.lower(): value for name, value in self.instance.header_pairs}
        headers: dict[str, str] = {}
        for number, line in enumerate(self.cleaned_data["header_lines"].splitlines(), 1):
            if not line.strip():
                continue
            name, colon, value = line.partition(":")
            name, value = name.strip(), value.strip()
            if not colon:
                raise forms.ValidationError(f"Line {number}: write `Name: value`.")
            if value in ("", SET):
                if name.lower() not in saved:
                    raise forms.ValidationError(f"Line {number}: {name} has no saved value to keep; give one.")
                value = saved[name.lower()]
            headers[name] = value
        try:
            templates_of(headers)
        except ValueError as exc:
            raise forms.ValidationError(str(exc).removeprefix("endpoint.headers").lstrip(".")) from exc
        return [[name, value] for name, value in headers.items()]

    def save(self, commit: bool = True) -> Destination:
        self.instance.headers = self.cleaned_data["header_lines"]
        return super().save(commit)


class RangeEndField(forms.Field):
    """A time typed as `manage.py replay` takes it, read by the same parser."""

    widget = forms.TextInput

    def __init__(self, parse: Callable[[str], datetime], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parse = parse

    def to_python(self, value: Any) -> datetime | None:
        if value in self.empty_values or not str(value).strip():
            return None
        try:
            return self.parse(str(value))
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc


class BulkReplayForm(forms.Form):
    """Replay every postback that failed for good in a time range, optionally to one host."""

    since = RangeEndField(parse_since)
    until = RangeEndField(
        parse_until,
        required=False,
        help_text="To this time (exclusive), in the same forms; a date: to the end of that day; empty: up to now.",
    )
    host = forms.CharField(required=False, max_length=255, help_text="Only postbacks to this host[:port].")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        zone = settings.TIME_ZONE
        self.fields["since"].help_text = (
            f"From this time: local time in {zone} (2026-12-04 14:00:00, as pages write it), ISO 8601 with an offset, "
            "or a date (from its start)."
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and until <= since:
            raise forms.ValidationError("The end must be later than the start.")
        return data
