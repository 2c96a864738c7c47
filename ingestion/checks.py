"""System checks for the ingestion limits and the proxies it believes."""

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, register

from postbackproject.addresses import invalid_networks


@register()
def check_ingestion_limits(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    positive = (
        "INGEST_MAX_BODY_BYTES",
        "INGEST_MAX_DATA_OBJECTS",
        "INGEST_MAX_QUEUED_JOBS",
        "INGEST_MAX_PLACEHOLDERS",
        "INGEST_MAX_RENDERED_BYTES",
    )
    for name in positive:
        if getattr(settings, name) < 1:
            errors.append(Error(f"{name} must be a positive number.", id="ingestion.E001"))
    for name in ("INGEST_RATE_LIMIT_PER_KEY", "INGEST_RATE_LIMIT_PER_ADDRESS"):
        if getattr(settings, name) < 0:
            errors.append(Error(f"{name} must be 0 (no limit) or more.", id="ingestion.E002"))
    for cidr in invalid_networks(settings.TRUSTED_PROXIES):
        errors.append(Error(f"TRUSTED_PROXIES: {cidr!r} is not a network (CIDR).", id="ingestion.E003"))
    return errors
