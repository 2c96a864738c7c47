"""django-rq's pages under /admin/rq/ ask for the "Queues and workers" permission, not just a
staff account, and never send the browser to another site."""

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from delivery import queue_pages
from postbackproject.postback import DRAIN
from postbackproject.queue import get_queue

pytestmark = pytest.mark.django_db

EVIL = "https://evil.example/phish"
# A value for each of django-rq's URL arguments.
ARGUMENTS = {
    "queue_index": 0,
    "job_id": "waiting",
    "result_id": "r",
    "key": "worker",
    "scheduler_index": 0,
    "connection_index": 0,
    "scheduler_name": "s",
    "cron_job_name": "c",
    "token": "t",
}


def every_queue_page() -> list[str]:
    """Each of django-rq's pages, with its arguments filled in."""
    paths = []
    for pattern in queue_pages.urlpatterns:
        wanted = set(pattern.pattern.regex.groupindex)
        paths.append(reverse(f"django_rq:{pattern.name}", kwargs={k: ARGUMENTS[k] for k in wanted}))
    return sorted(set(paths))


@pytest.fixture
def jobs() -> tuple[Job, Job]:
    """A drain job waiting in the queue and one in the failed registry."""
    queue = get_queue()
    waiting = queue.enqueue(DRAIN, "drainer-1", job_id="waiting")
    failed = queue.enqueue(DRAIN, "drainer-2", job_id="failed")
    queue.remove(failed)
    failed.set_status(JobStatus.FAILED)
    FailedJobRegistry(queue=queue).add(failed, exc_string="boom")
    return waiting, failed


def untouched(waiting: Job, failed: Job) -> bool:
    queue = get_queue()
    return queue.job_ids == [waiting.id] and FailedJobRegistry(queue=queue).get_job_ids() == [failed.id]


def staff(username: str, *permissions: str) -> Client:
    user = User.objects.create_user(username, password="a-long-test-password", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def clerk() -> Client:
    """Staff who may see the attempts and circuits, not the queues."""
    return staff("clerk", "view_deliveryattempt", "view_circuitbreaker")


@pytest.fixture
def queue_viewer() -> Client:
    return staff("ops", "view_queuemonitor")


def test_every_queue_page_is_forbidden_to_staff_without_the_queues_permission(clerk, jobs):
    pages = every_queue_page()
    assert len(pages) >= 20  # the queues, jobs, empty, requeue all, clear failed, delete, confirm, stats...

    for path in pages:
        assert clerk.get(path).status_code == 403, path
        posted = clerk.post(path, {"action": "delete", "job_ids": ["waiting"], "_selected_action": ["waiting"]})
        assert posted.status_code == 403, path

    assert untouched(*jobs)


@pytest.mark.parametrize(
    "name",
    ["clear", "requeue_all", "delete_failed_jobs", "delete_job", "requeue_job", "enqueue_job", "stop_job", "actions"],
)
def test_each_action_posted_by_staff_without_the_permission_changes_nothing(clerk, jobs, name):
    kwargs = {"queue_index": 0} | ({"job_id": "waiting"} if "job" in name and name != "delete_failed_jobs" else {})
    response = clerk.post(reverse(f"django_rq:{name}", kwargs=kwargs), {"action": "delete", "job_ids": ["waiting"]})
    assert response.status_code == 403
    assert untouched(*jobs)


def test_anonymous_visitors_are_sent_to_the_login_page(client, jobs):
    for path in every_queue_page():
        response = client.post(path, {"action": "delete", "job_ids": ["waiting"]})
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/?next="), path
    assert untouched(*jobs)


def test_the_queues_and_workers_entry_and_its_pages_ask_for_one_permission(clerk, queue_viewer):
    assert "Queues and workers" not in clerk.get("/admin/").content.decode()
    assert clerk.get("/admin/delivery/queuemonitor/").status_code == 403
    assert clerk.get("/admin/rq/").status_code == 403
    assert "Queues and workers" in queue_viewer.get("/admin/").content.decode()
    assert queue_viewer.get("/admin/rq/").status_code == 200
    assert queue_viewer.get("/admin/django_rq/dashboard/").status_code == 404  # django-rq's own entry is off


def test_only_staff_with_the_permission_see_the_queue_and_its_jobs(clerk, queue_viewer, jobs):
    for path in ["/admin/rq/queues/0/", "/admin/rq/queues/0/failed/", "/admin/rq/queues/0/waiting/"]:
        assert clerk.get(path).status_code == 403, path
        assert queue_viewer.get(path).status_code == 200, path
    assert "waiting" in queue_viewer.get("/admin/rq/queues/0/").content.decode()


def test_only_staff_with_the_permission_can_empty_the_queue(clerk, queue_viewer, jobs):
    assert clerk.post("/admin/rq/queues/0/empty/").status_code == 403
    assert get_queue().job_ids == ["waiting"]
    assert queue_viewer.post("/admin/rq/queues/0/empty/").status_code == 302
    assert get_queue().job_ids == []


def test_only_staff_with_the_permission_can_requeue_and_clear_failed_jobs(clerk, queue_viewer, jobs):
    waiting, failed = jobs
    assert clerk.post("/admin/rq/queues/0/requeue-all/").status_code == 403
    assert queue_viewer.post("/admin/rq/queues/0/requeue-all/").status_code == 302
    assert get_queue().job_ids == [waiting.id, failed.id]

    get_queue().remove(failed)
    FailedJobRegistry(queue=get_queue()).add(failed, exc_string="boom")
    assert clerk.post("/admin/rq/queues/0/failed/clear/").status_code == 403
    assert queue_viewer.post("/admin/rq/queues/0/failed/clear/").status_code == 302
    assert FailedJobRegistry(queue=get_queue()).get_job_ids() == []


def test_only_staff_with_the_permission_can_delete_a_job(clerk, queue_viewer, jobs):
    assert clerk.post("/admin/rq/queues/0/waiting/delete/").status_code == 403
    assert get_queue().job_ids == ["waiting"]
    assert queue_viewer.post("/admin/rq/queues/0/waiting/delete/").status_code == 302
    assert get_queue().job_ids == []


def test_superusers_need_no_permission_of_their_own(clerk, jobs):
    root = Client()
    root.force_login(User.objects.create_superuser("root", "root@example.com", "a-long-test-password"))
    assert clerk.get("/admin/rq/queues/0/empty/").status_code == 403
    assert root.get("/admin/rq/queues/0/empty/").status_code == 200


def test_the_confirm_page_returns_to_a_referer_on_this_site_only(queue_viewer, jobs):
    confirm = "/admin/rq/queues/confirm-action/0/"
    page = queue_viewer.post(confirm, {"action": "delete", "_selected_action": ["waiting"]}, HTTP_REFERER=EVIL)
    assert page.status_code == 200
    assert "evil.example" not in page.content.decode()

    nothing_chosen = queue_viewer.post(confirm, {}, HTTP_REFERER=EVIL)
    assert nothing_chosen.status_code == 302 and nothing_chosen["Location"] == "/admin/rq/queues/0/"

    back = "http://testserver/admin/rq/queues/0/failed/"
    assert queue_viewer.post(confirm, {}, HTTP_REFERER=back)["Location"] == back


def test_an_action_never_redirects_to_another_site(queue_viewer, jobs):
    response = queue_viewer.post(
        "/admin/rq/queues/actions/0/", {"action": "requeue", "job_ids": ["failed"], "next_url": EVIL}
    )
    assert response.status_code == 302 and response["Location"] == "/admin/rq/"
