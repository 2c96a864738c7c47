"""Signed postbacks: the real worker signs, a real receiver checks with the `standardwebhooks`
package from PyPI, as receivers would; secrets and the switch are managed in admin."""

import base64
import io
import time

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from delivery.forms import EDITABLE_FIELDS
from delivery.models import DeliverySettings, SigningSecret
from delivery.signing import signature_headers
from tests.conftest import Reply, deliver_everything, ingest_json, run_worker, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def secrets_active(count: int) -> list[str]:
    return [SigningSecret.objects.create(label=f"secret {n}").secret for n in range(count)]


def signing_on(backoff_base_seconds: float = 0) -> None:
    DeliverySettings(sign_postbacks=True, backoff_base_seconds=backoff_base_seconds).save()


def send_one(client, receiver, method: str = "POST") -> None:
    document = {"endpoint": {"method": method, "url": receiver.url("/hook?v={v}")}, "data": [{"v": "a b", "n": 1.50}]}
    assert ingest_json(client, document).status_code == 202


def lowered(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


# --- delivery --------------------------------------------------------------------------------


def test_it_sends_no_webhook_headers_while_signing_is_off(client, receiver):
    secrets_active(1)  # a secret alone does not sign: the switch is off by default
    send_one(client, receiver)
    run_worker()
    [request] = receiver.requests
    assert not [name for name in request.headers if name.lower().startswith("webhook-")]


def test_a_signed_post_verifies_with_the_standardwebhooks_package(client, receiver):
    [secret] = secrets_active(1)
    signing_on()
    send_one(client, receiver, "POST")
    run_worker()

    [request] = receiver.requests
    headers = lowered(request.headers)
    assert headers["webhook-id"] == headers["x-postback-id"]
    assert Webhook(secret).verify(request.body, request.headers) == {"v": "a b", "n": 1.5}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(request.body.replace(b"a b", b"a c"), request.headers)  # a forged body


def test_a_signed_get_verifies_over_an_empty_body(client, receiver):
    [secret] = secrets_active(1)
    signing_on()
    send_one(client, receiver, "GET")
    run_worker()

    [request] = receiver.requests
    assert request.body == b""
    Webhook(secret).verify(request.body, request.headers, json_parse=False)  # raises if it does not verify


def test_two_active_secrets_give_two_signatures_each_verifying_with_its_own_secret(client, receiver):
    secrets = secrets_active(2)
    signing_on()
    send_one(client, receiver)
    run_worker()

    [request] = receiver.requests
    signatures = lowered(request.headers)["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(part.startswith("v1,") for part in signatures)

    def verifies(secret: str, signature: str) -> bool:
        try:
            Webhook(secret).verify(request.body, {**request.headers, "webhook-signature": signature})
        except WebhookVerificationError:
            return False
        return True

    # Oldest secret first, each signature made by exactly one of them.
    assert [[verifies(secret, part) for part in signatures] for secret in secrets] == [[True, False], [False, True]]


def test_a_retried_attempt_carries_a_new_timestamp_and_a_valid_signature(client, receiver):
    [secret] = secrets_active(1)
    signing_on(backoff_base_seconds=10)  # the retry waits in the schedule until released below
    receiver.answer(Reply(status=503))
    send_one(client, receiver)
    run_worker()
    [first] = receiver.requests
    first_time = int(lowered(first.headers)["webhook-timestamp"])

    # Timestamps are whole seconds: let the clock pass the first one before the retry goes out.
    wait_until(lambda: int(time.time()) > first_time, what="the next second")
    deliver_everything()

    [_, retried] = receiver.requests
    headers = lowered(retried.headers)
    assert headers["x-postback-attempt"] == "2"
    assert headers["webhook-id"] == lowered(first.headers)["webhook-id"]
    assert int(headers["webhook-timestamp"]) > first_time
    assert headers["webhook-signature"] != lowered(first.headers)["webhook-signature"]
    Webhook(secret).verify(retried.body, retried.headers)


def test_a_worker_reads_the_secrets_with_its_settings_not_per_request(client, receiver, settings):
    settings.DELIVERY_SETTINGS_CACHE_SECONDS = 3600  # as in production: one read per refresh
    [secret] = secrets_active(1)
    endpoint = {"method": "GET", "url": receiver.url("/hook?v={v}")}
    ingest_json(client, {"endpoint": endpoint, "data": [{"v": n} for n in range(20)]})
    signing_on()  # saving the settings makes this process read them (and the secrets) afresh

    with CaptureQueriesContext(connection) as queries:
        run_worker()

    assert len(receiver.requests) == 20
    for request in receiver.requests:
        Webhook(secret).verify(request.body, request.headers, json_parse=False)
    assert len([query for query in queries if "delivery_signingsecret" in query["sql"]]) == 1


def test_it_reproduces_the_specifications_published_test_vector():
    # The reference library's own test of its signer: standard-webhooks/standard-webhooks,
    # libraries/python/tests/test_webhooks.py, test_sign_function (secret, id, timestamp,
    # payload and expected signature as published there).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    headers = signature_headers("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}', [secret])
    assert headers == [
        "webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp: 1614265330",
        "webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ]


# --- admin -----------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password"))
    return client


def settings_form(**changes: str) -> dict[str, object]:
    """The settings admin's form as a browser posts it (an unticked box is not sent)."""
    defaults = model_to_dict(DeliverySettings(), fields=EDITABLE_FIELDS)
    posted = {name: value for name, value in defaults.items() if not isinstance(value, bool)}
    return {**posted, **changes}


def test_adding_a_secret_in_admin_generates_it_and_shows_it_to_staff(staff_client):
    response = staff_client.post(
        "/admin/delivery/signingsecret/add/", {"label": "receivers", "active": "on", "secret": "whsec_typed"}
    )
    assert response.status_code == 302
    [stored] = SigningSecret.objects.all()
    assert stored.secret.startswith("whsec_") and stored.secret != "whsec_typed"
    assert len(base64.b64decode(stored.secret.removeprefix("whsec_"))) == 32
    page = staff_client.get(f"/admin/delivery/signingsecret/{stored.pk}/change/").content.decode()
    assert stored.secret in page


def test_the_admin_refuses_a_third_active_secret(staff_client):
    secrets_active(2)
    refused = staff_client.post("/admin/delivery/signingsecret/add/", {"label": "third", "active": "on"})
    assert refused.status_code == 200
    assert "At most 2 signing secrets can be active at once" in refused.content.decode()
    assert SigningSecret.objects.count() == 2

    kept_aside = staff_client.post("/admin/delivery/signingsecret/add/", {"label": "next, inactive"})
    assert kept_aside.status_code == 302
    assert SigningSecret.objects.filter(active=True).count() == 2


@pytest.mark.parametrize("staff", [False, True])
def test_signing_secrets_are_for_staff_with_permission_only(client, staff):
    client.force_login(User.objects.create_user("analyst", password="a-long-test-password", is_staff=staff))
    response = client.get("/admin/delivery/signingsecret/")
    # Not staff: sent to the login page. Staff without the permission: refused.
    assert response.status_code == (403 if staff else 302)


def test_the_settings_form_refuses_signing_without_an_active_secret(staff_client):
    DeliverySettings().save()
    url = "/admin/delivery/deliverysettings/1/change/"
    refused = staff_client.post(url, settings_form(sign_postbacks="on"))
    assert refused.status_code == 200
    assert "Signing needs an active signing secret" in refused.content.decode()
    assert not DeliverySettings.load().sign_postbacks
    with pytest.raises(CommandError, match="Signing needs an active signing secret"):
        call_command("deliverysettings", "--set", "sign_postbacks=true", stdout=io.StringIO())

    secrets_active(1)
    assert staff_client.post(url, settings_form(sign_postbacks="on")).status_code == 302
    assert DeliverySettings.load().sign_postbacks


def test_the_last_active_secret_cannot_be_deactivated_or_deleted_while_signing_is_on(staff_client):
    secrets_active(1)
    signing_on()
    [only] = SigningSecret.objects.all()
    refused = staff_client.post(f"/admin/delivery/signingsecret/{only.pk}/change/", {"label": only.label})
    assert refused.status_code == 200
    assert "This is the last active secret and postbacks are signed" in refused.content.decode()
    assert staff_client.get(f"/admin/delivery/signingsecret/{only.pk}/delete/").status_code == 403

    # The rotation: add the new secret, then retire the old one.
    secrets_active(1)
    retired = staff_client.post(f"/admin/delivery/signingsecret/{only.pk}/change/", {"label": only.label})
    assert retired.status_code == 302
    assert SigningSecret.active_secrets() != () and only.secret not in SigningSecret.active_secrets()
    assert staff_client.post(f"/admin/delivery/signingsecret/{only.pk}/delete/", {"post": "yes"}).status_code == 302
