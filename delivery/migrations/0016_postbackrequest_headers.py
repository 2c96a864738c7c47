"""The sender's headers (`endpoint.headers`, as sent) stored with each postback's request.

A column with a constant default: existing rows read `{}`. On PostgreSQL the request table is
partitioned by day (migration 0015): ADD COLUMN on the partitioned table adds the column to
every partition, and partitions made later take it from the table; a constant default costs
no rewrite of the rows already written (PostgreSQL 11 and later). On SQLite it is one ALTER
TABLE. The default stays in the database (`db_default`), so that writers that name no
`headers` column (a copy of seeded rows) still write `{}`.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("delivery", "0015_requests_stored_once"),
    ]

    operations = [
        migrations.AddField(
            model_name="postbackrequest",
            name="headers",
            field=models.JSONField(
                blank=True,
                db_default={},
                default=dict,
                help_text="The sender's headers (endpoint.headers) as sent, placeholders replaced: names to values.",
            ),
        ),
    ]
