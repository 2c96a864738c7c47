"""Migration 0010: the per-host cap's old default gives way to no cap of its own."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("delivery", "0009_circuit_threshold_10")]
AFTER = [("delivery", "0010_per_host_cap_off_by_default")]


def migrate(targets: list[tuple[str, str]]) -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("latest_migrations_after")
@pytest.mark.parametrize(("before", "after"), [(56, 0), (20, 20)])
def test_a_settings_row_holding_the_old_default_takes_the_new_one_and_a_tuned_one_is_kept(before, after):
    executor = migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps.get_model("delivery", "DeliverySettings")
    old.objects.update_or_create(pk=1, defaults={"max_in_flight_per_host": before})

    executor = migrate(AFTER)
    new = executor.loader.project_state(AFTER).apps.get_model("delivery", "DeliverySettings")

    assert new.objects.get(pk=1).max_in_flight_per_host == after
