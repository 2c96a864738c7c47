"""Replaying postbacks that failed for good: same id, same request, a fresh series of tries."""

import io
import re
import subprocess
import sys

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.utils import timezone

from delivery import replay as replay_module
from delivery.models import DeliveryAttempt, DeliverySettings
from postbackproject.queue import get_queue
from postbackproject.settings import BASE_DIR
from tests.conftest import Receiver, Reply, deliver_everything, ingest_json, service_env

pytestmark = pytest.mark.django_db(transaction=True)


def replay_command(*args: str) -> str:
    out = io.StringIO()
    call_command("replay", *args, stdout=out)
    return out.getvalue()


def history(postback_id: str) -> list[tuple[int, str, int | None]]:
    rows = DeliveryAttempt.objects.filter(postback_id=postback_id).order_by("attempt")
    return [(row.attempt, row.outcome, row.response_code) for row in rows]


def failed_once(client, receiver, document):
    receiver.answer(Reply(404))
    [pid] = ingest_json(client, document).json()["postbacks"]
    deliver_everything()
    assert history(pid) == [(1, "failed", 404)]
    return pid


def test_a_failed_postback_is_sent_again_as_it_was(client, receiver):
    document = {"endpoint": {"method": "POST", "url": receiver.url("/r?q={q}&x={missing}")}, "data": [{"q": "a/b"}]}
    pid = failed_once(client, receiver, document)
    DeliverySettings(unmatched_default="changed since").save()

    assert "1 of 1 postbacks queued" in replay_command(pid)
    deliver_everything()

    first, again = receiver.requests
    assert (again.method, again.target, again.body) == (first.method, first.target, first.body)
    assert again.headers["X-Postback-Id"] == pid
    assert history(pid) == [(1, "failed", 404), (2, "success", 200)]


def test_a_replay_gets_a_fresh_series_of_tries(client, receiver):
    DeliverySettings(max_attempts=2, backoff_base_seconds=0).save()
    receiver.answer(Reply(500), Reply(500), Reply(500), Reply(200))
    [pid] = ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/f")}, "data": [{}]}).json()[
        "postbacks"
    ]
    deliver_everything()

    replay_command(pid)
    deliver_everything()

    assert [(a, o) for a, o, _ in history(pid)] == [(1, "retry"), (2, "failed"), (3, "retry"), (4, "success")]


def test_only_postbacks_that_failed_for_good_are_replayed(client, receiver):
    [pid] = ingest_json(client, {"endpoint": {"method": "GET", "url": receiver.url("/ok")}, "data": [{}]}).json()[
        "postbacks"
    ]
    deliver_everything()

    out = io.StringIO()
    with pytest.raises(CommandError):  # the unknown id
        call_command("replay", pid, "no-such-id", stdout=out)
    answer = out.getvalue()
    assert "0 of 2 postbacks queued again; 1 unknown, with no attempt on record: no-such-id; 1 had not failed" in answer
    assert get_queue().count == 0


def test_unknown_ids_end_the_command_with_status_3_after_the_known_ones_are_replayed(client, receiver):
    pid = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/u")}, "data": [{}]})
    out = io.StringIO()

    with pytest.raises(CommandError, match="unknown postback ids, with no attempt on record: nope-1") as raised:
        call_command("replay", pid, "nope-1", stdout=out)

    assert raised.value.returncode == 3
    assert "1 of 2 postbacks queued again; 1 unknown" in out.getvalue()
    deliver_everything()
    assert history(pid)[-1][1] == "success"


def test_a_script_sees_status_3_and_the_message_for_an_unknown_id():
    finished = subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), "replay", "nope-1"],
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 3, finished.stderr
    assert "unknown postback ids, with no attempt on record: nope-1" in finished.stderr
    assert "0 of 1 postbacks queued again" in finished.stdout
    assert "Traceback" not in finished.stderr


def test_everything_failed_since_a_time_can_be_replayed(client, receiver, monkeypatch):
    monkeypatch.setattr(replay_module, "REPLAY_CHUNK", 1)  # two chunks for two postbacks
    pids = [
        failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url(f"/s{n}")}, "data": [{}]})
        for n in range(2)
    ]

    assert "2 of 2 postbacks queued" in replay_command("--since", "2000-01-01T00:00Z")
    deliver_everything()

    assert all(history(pid)[-1][1] == "success" for pid in pids)


def test_the_command_explains_its_arguments():
    with pytest.raises(CommandError, match="name postback ids"):
        replay_command()
    with pytest.raises(CommandError, match="ISO 8601"):
        replay_command("--since", "yesterday")
    with pytest.raises(CommandError, match="ISO 8601"):
        replay_command("--since", "2026-02-30T00:00Z")
    with pytest.raises(CommandError, match="ISO 8601"):
        replay_command("--since", "2026-12-04T14:00+99:00")


def test_a_bad_time_on_the_command_line_gets_the_message_alone():
    """As typed in a shell: the usage line and the message, no traceback."""
    finished = subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), "replay", "--since", "2026-11-28 nine"],
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    assert "argument --since: use a local time in TIME_ZONE (2026-12-04T14:00" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_date_means_its_midnight_in_the_configured_zone(client, receiver, settings):
    settings.TIME_ZONE = "Europe/Paris"
    pid = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/d")}, "data": [{}]})
    DeliveryAttempt.objects.filter(postback_id=pid).update(delivered_at="2026-11-27T23:30Z")  # 00:30 in Paris

    assert "1 of 1 postbacks queued" in replay_command("--since", "2026-11-28")


def test_staff_with_the_permission_replay_from_admin(client, receiver):
    pid = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/adm")}, "data": [{}]})
    user = User.objects.create_user("ops", password="a-long-test-password", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_deliveryattempt", "replay_postback"]))
    client.force_login(user)
    row = DeliveryAttempt.objects.get(postback_id=pid)

    response = client.post(
        "/admin/delivery/deliveryattempt/", {"action": "replay_postbacks", "_selected_action": [row.pk]}, follow=True
    )

    assert "1 of 1 postbacks queued again" in response.content.decode()
    deliver_everything()
    assert history(pid)[-1][1] == "success"


def test_staff_without_the_permission_see_no_replay_action(client, receiver):
    user = User.objects.create_user("viewer", password="a-long-test-password", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_deliveryattempt"))
    client.force_login(user)
    page = client.get("/admin/delivery/deliveryattempt/").content.decode()
    assert "replay_postbacks" not in page


def test_a_range_replays_only_what_failed_between_its_ends_and_to_its_host(client, receiver):
    other = Receiver()
    try:
        early = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/e")}, "data": [{}]})
        middle = timezone.now()
        late = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/l")}, "data": [{}]})
        elsewhere = failed_once(client, other, {"endpoint": {"method": "GET", "url": other.url("/o")}, "data": [{}]})

        host = f"127.0.0.1:{receiver.port}"
        out = replay_command("--since", middle.isoformat(), "--until", timezone.now().isoformat(), "--host", host)
        assert "1 of 1 postbacks queued" in out
        deliver_everything()

        assert history(late)[-1][1] == "success"
        assert history(early)[-1][1] == "failed" and history(elsewhere)[-1][1] == "failed"
    finally:
        other.close()


def test_a_postback_delivered_since_is_not_replayed_again(client, receiver):
    pid = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/d")}, "data": [{}]})
    replay_command(pid)
    deliver_everything()

    assert "0 of 1 postbacks queued" in replay_command("--since", "2000-01-01T00:00Z")
    assert history(pid) == [(1, "failed", 404), (2, "success", 200)]


def test_the_range_options_go_with_since():
    with pytest.raises(CommandError, match="go with --since"):
        replay_command("--host", "a.example")
    with pytest.raises(CommandError, match="later than --since"):
        replay_command("--since", "2026-11-29T10:00Z", "--until", "2026-11-29T09:00Z")


def replayer(client):
    user = User.objects.create_user("ops2", password="a-long-test-password", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_deliveryattempt", "replay_postback"]))
    client.force_login(user)
    return client


def test_admin_counts_then_replays_everything_failed_in_a_range(client, receiver):
    pid = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/b")}, "data": [{}]})
    replayer(client)
    params = {"since": "2000-01-01T00:00Z", "until": "", "host": f"127.0.0.1:{receiver.port}"}

    counted = client.get("/admin/delivery/deliveryattempt/replay/", params).content.decode()
    assert "<strong>1</strong> postback failed for good" in counted
    response = client.post("/admin/delivery/deliveryattempt/replay/", params, follow=True)
    assert "1 of 1 postbacks queued again" in response.content.decode()
    deliver_everything()
    assert history(pid)[-1][1] == "success"


def test_the_postback_page_replays_it_and_comes_back(client, receiver):
    pid = failed_once(client, receiver, {"endpoint": {"method": "GET", "url": receiver.url("/p")}, "data": [{}]})
    replayer(client)
    page = client.get(f"/dashboard/postbacks/{pid}/").content.decode()
    assert 'id="replay"' in page

    response = client.post(
        "/admin/delivery/deliveryattempt/replay/", {"postback_id": pid, "next": f"/dashboard/postbacks/{pid}/"}
    )
    assert response.status_code == 302 and response["Location"] == f"/dashboard/postbacks/{pid}/"
    deliver_everything()
    page = client.get(f"/dashboard/postbacks/{pid}/").content.decode()
    assert 'id="replay"' not in page
    assert history(pid) == [(1, "failed", 404), (2, "success", 200)]


def test_replay_in_bulk_needs_the_permission(client):
    user = User.objects.create_user("looker", password="a-long-test-password", is_staff=True)
    client.force_login(user)
    assert client.get("/admin/delivery/deliveryattempt/replay/").status_code == 403
    assert client.post("/admin/delivery/deliveryattempt/replay/", {"postback_id": "x"}).status_code == 403


# --- the time formats, the same in the command and the admin form ---------------------------


def failed_at(client, receiver, *times: str) -> list[str]:
    """Postbacks that failed for good, one at each of these times (UTC, ISO 8601)."""
    receiver.default = Reply(404)
    document = {"endpoint": {"method": "GET", "url": receiver.url("/t")}, "data": [{} for _ in times]}
    pids: list[str] = ingest_json(client, document).json()["postbacks"]
    deliver_everything()
    for pid, when in zip(pids, times, strict=True):
        DeliveryAttempt.objects.filter(postback_id=pid).update(delivered_at=when)
    receiver.default = Reply(200)
    return pids


def replayable_by_command(*args: str) -> int:
    """How many postbacks the command queued again."""
    return int(replay_command(*args).split(" of ")[0])


def replayable_in_admin(client, since: str, until: str = "") -> int:
    """How many postbacks admin's replay page counts (without replaying them)."""
    page = client.get("/admin/delivery/deliveryattempt/replay/", {"since": since, "until": until}).content.decode()
    found = re.search(r"<strong>(\d+)</strong> postbacks? failed for good", page)
    assert found, page
    return int(found.group(1))


# 14:30 in Paris. Each start below is 14:20 there: read as UTC it would be after the failure.
FAILED_AT = "2026-12-04T13:30Z"
STARTS_AT_14_20_IN_PARIS = [
    "2026-12-04T14:20",
    "2026-12-04 14:20",
    "2026-12-04T14:20:00",
    "2026-12-04T14:20+01:00",
    "2026-12-04T13:20Z",
    " 2026-12-04 14:20 ",
]


@pytest.mark.parametrize("since", STARTS_AT_14_20_IN_PARIS)
def test_the_command_and_the_admin_form_take_the_same_times(client, receiver, settings, since):
    settings.TIME_ZONE = "Europe/Paris"
    failed_at(client, receiver, FAILED_AT)
    replayer(client)

    assert replayable_in_admin(client, since, "2026-12-04T14:40") == 1
    assert replayable_by_command("--since", since, "--until", "2026-12-04T14:40") == 1


# Paris: 3 December 23:30, 4 December 00:30 and 23:30, 5 December 00:30.
AROUND_THE_4TH_IN_PARIS = ["2026-12-03T22:30Z", "2026-12-03T23:30Z", "2026-12-04T22:30Z", "2026-12-04T23:30Z"]


def test_the_same_date_as_since_and_until_is_that_whole_day_in_the_command(client, receiver, settings):
    settings.TIME_ZONE = "Europe/Paris"
    before, first, last, after = failed_at(client, receiver, *AROUND_THE_4TH_IN_PARIS)

    assert replayable_by_command("--since", "2026-12-04", "--until", "2026-12-04") == 2
    deliver_everything()

    assert [history(pid)[-1][1] for pid in (before, first, last, after)] == ["failed", "success", "success", "failed"]


def test_the_same_date_as_since_and_until_is_that_whole_day_in_the_admin_form(client, receiver, settings):
    settings.TIME_ZONE = "Europe/Paris"
    failed_at(client, receiver, *AROUND_THE_4TH_IN_PARIS)
    replayer(client)

    assert replayable_in_admin(client, "2026-12-04", "2026-12-04") == 2


def test_the_admin_form_names_the_formats_it_takes(client, settings):
    settings.TIME_ZONE = "Europe/Paris"
    replayer(client)

    page = client.get("/admin/delivery/deliveryattempt/replay/", {"since": "yesterday"}).content.decode()

    assert "local time in Europe/Paris" in page
    assert "use a local time in TIME_ZONE (2026-12-04T14:00 or 2026-12-04 14:00)" in page
