"""Operations endpoints: what load balancers and monitoring see."""

import pytest

from tests.conftest import free_port, use_redis


@pytest.mark.django_db
def test_healthz_answers_without_redis_or_database(client, settings, django_assert_num_queries):
    use_redis(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    with django_assert_num_queries(0):
        response = client.get("/healthz")

    assert response.status_code == 200
    assert response.content == b"ok\n"


def test_healthz_is_not_redirected_to_https(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/healthz").status_code == 200
    assert client.get("/dashboard/").status_code == 301


def test_healthz_takes_only_get_and_head(client):
    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405
