"""Admin for sender keys: issued here and shown once, listed by prefix, revoked by unticking."""

from django.contrib import admin, messages
from django.db import models
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import add_never_cache_headers

from ingestion.models import SenderKey
from ingestion.senders import KeyTable
from postbackproject.numbers import PlainNumberInput, plain_number


@admin.register(SenderKey)
class SenderKeyAdmin(admin.ModelAdmin[SenderKey]):
    list_display = ["prefix", "name", "active", "rate_limit_shown", "created_at"]
    list_filter = ["active"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["prefix", "created_at"]
    actions = ["revoke"]
    formfield_overrides = {models.FloatField: {"widget": PlainNumberInput}}

    @admin.display(description="rate limit", ordering="rate_limit", empty_value="default")
    def rate_limit_shown(self, obj: SenderKey) -> str | None:
        return None if obj.rate_limit is None else plain_number(obj.rate_limit)

    def get_fields(self, request: HttpRequest, obj: SenderKey | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("name", "rate_limit")  # the key is made on saving, and shown then
        return ("name", "prefix", "active", "rate_limit", "created_at")

    def save_model(self, request: HttpRequest, obj: SenderKey, form: ModelForm[SenderKey], change: bool) -> None:
        if not change:
            obj.issue_key()
        super().save_model(request, obj, form, change)

    def response_add(self, request: HttpRequest, obj: SenderKey, post_url_continue: str | None = None) -> HttpResponse:
        """The one page that shows the key: answered to the POST that made it, never stored
        (not in a message, which could land in the session table) and never cached."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Sender key issued",
            "sender_key": obj,
            "key": obj.issued_key,
            "change_url": reverse("admin:ingestion_senderkey_change", args=[obj.pk]),
        }
        response = TemplateResponse(request, "admin/ingestion/senderkey/issued.html", context)
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[SenderKey]) -> None:
        revoked = queryset.filter(active=True).update(active=False)
        KeyTable.forget()  # update() sends no signal
        self.message_user(request, f"Revoked {revoked} key(s). Senders using them now get 401.", messages.SUCCESS)
