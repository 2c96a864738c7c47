"""The one validation of delivery settings, shared by admin and the command line."""

from typing import Any

from django import forms

from delivery.models import DeliverySettings

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
    "batch_size",
    "max_in_flight_per_host",
    "circuit_failure_threshold",
    "circuit_open_seconds",
]


class DeliverySettingsForm(forms.ModelForm[DeliverySettings]):
    class Meta:
        model = DeliverySettings
        fields = EDITABLE_FIELDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Form fields strip whitespace by default; an admin may mean a space.
        self.fields["unmatched_default"].strip = False  # type: ignore[attr-defined]


class BulkReplayForm(forms.Form):
    """Replay every postback that failed for good in a time range, optionally to one host."""

    since = forms.DateTimeField(help_text="From this time (local time, or ISO 8601 with an offset).")
    until = forms.DateTimeField(required=False, help_text="To this time (exclusive); empty: up to now.")
    host = forms.CharField(required=False, max_length=255, help_text="Only postbacks to this host[:port].")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and until <= since:
            raise forms.ValidationError("The end must be later than the start.")
        return data
