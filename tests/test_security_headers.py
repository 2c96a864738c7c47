"""The Content-Security-Policy every page is served with, and templates that can live under it.
(That the pages work under it in a browser: tests/test_browser.py.)"""

import re

import pytest
from django.contrib.auth.models import User

from postbackproject.settings import BASE_DIR

pytestmark = pytest.mark.django_db

POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}

# What a CSP without 'unsafe-inline' refuses in markup: <script> without src, <style>, style=
# and on...= attributes.
INLINE = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=|\son[a-z]+=", re.I)


def directives(header: str) -> dict[str, list[str]]:
    parsed = (part.split() for part in header.split(";") if part.strip())
    return {name: sources for name, *sources in parsed}


@pytest.fixture
def staff_client(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password"))
    return client


@pytest.mark.parametrize(
    "path",
    [
        "/admin/",
        "/admin/delivery/deliveryattempt/",
        "/admin/delivery/deliverysettings/",  # redirected to the one row's change form
        "/admin/auth/user/add/",
        "/admin/rq/",
        "/dashboard/",
        "/dashboard/api/volume?range=1h",
    ],
)
def test_admin_and_dashboard_pages_carry_the_strict_policy(staff_client, path):
    response = staff_client.get(path, follow=True)

    assert response.status_code == 200
    assert directives(response["Content-Security-Policy"]) == POLICY


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
def test_the_login_pages_carry_the_strict_policy(client, path):
    response = client.get(path)

    assert response.status_code == 200
    assert directives(response["Content-Security-Policy"]) == POLICY


def test_the_policy_allows_nothing_inline_and_no_framing(client):
    header = client.get("/login/")["Content-Security-Policy"]

    assert "unsafe" not in header
    assert "frame-ancestors 'none'" in header
    assert client.get("/login/")["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("template", sorted((BASE_DIR / "templates").rglob("*.html")), ids=lambda path: path.name)
def test_no_template_of_ours_has_inline_script_or_style(template):
    assert INLINE.findall(template.read_text()) == []
