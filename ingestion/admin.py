"""Admin for sender keys: issued here and shown once, listed by prefix, revoked by unticking."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.cache import add_never_cache_headers

from ingestion import shown_once
from ingestion.models import SenderKey
from ingestion.senders import KeyTable
from postbackproject.numbers import PlainNumberInput, plain_number

ISSUED_URL_NAME = "ingestion_senderkey_issued"


def shown_once_name(key_id: int) -> str:
    return f"sender-key-{key_id}"


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

    def get_urls(self) -> list[URLPattern]:
        # Before the default ones: their catch-all `<path:object_id>/` would take it.
        issued = path("<int:key_id>/issued/", self.admin_site.admin_view(self.issued_view), name=ISSUED_URL_NAME)
        return [issued, *super().get_urls()]

    def response_add(self, request: HttpRequest, obj: SenderKey, post_url_continue: str | None = None) -> HttpResponse:
        """Post/redirect/get: the POST that made the key redirects to the page that shows it,
        so that reloading that page never issues another key. The key crosses the redirect
        split between the session and a cookie (ingestion/shown_once.py), never whole."""
        page = reverse(f"admin:{ISSUED_URL_NAME}", args=[obj.pk])
        response = HttpResponseRedirect(page)
        shown_once.keep(request, response, shown_once_name(obj.pk), obj.issued_key, page)
        return response

    def issued_view(self, request: HttpRequest, key_id: int) -> HttpResponse:
        """The one page that shows a new key, on its first display only; afterwards it says
        that the key was shown already. Never cached."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        sender_key = get_object_or_404(SenderKey, pk=key_id)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Sender key issued",
            "sender_key": sender_key,
            "change_url": reverse("admin:ingestion_senderkey_change", args=[key_id]),
        }
        response = TemplateResponse(request, "admin/ingestion/senderkey/issued.html", context)
        key = shown_once.take(request, response, shown_once_name(key_id), request.path)
        response.context_data = {**context, "key": key}  # rendered lazily: the key counts
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[SenderKey]) -> None:
        revoked = queryset.filter(active=True).update(active=False)
        KeyTable.forget()  # update() sends no signal
        self.message_user(request, f"Revoked {revoked} key(s). Senders using them now get 401.", messages.SUCCESS)
