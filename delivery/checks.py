"""System checks: configuration mistakes reported by `manage.py check` and at startup."""

import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, register

from postbackproject.addresses import invalid_networks


@register()
def check_delivery_configuration(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for cidr in invalid_networks(settings.DELIVERY_ALLOW_NETWORKS):
        errors.append(Error(f"DELIVERY_ALLOW_NETWORKS: {cidr!r} is not a network (CIDR).", id="delivery.E001"))
    if settings.DELIVERY_CONCURRENCY < 1:
        errors.append(Error("DELIVERY_CONCURRENCY must be at least 1.", id="delivery.E002"))
    if settings.DELIVERY_IDLE_CONNECTIONS < 0:
        errors.append(Error("DELIVERY_IDLE_CONNECTIONS must be 0 or more.", id="delivery.E004"))
    bundle = settings.DELIVERY_CA_BUNDLE
    if bundle and not os.access(bundle, os.R_OK):
        errors.append(Error(f"DELIVERY_CA_BUNDLE: {bundle!r} is not a readable file.", id="delivery.E003"))
    return errors
