from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("delivery", "0016_postbackrequest_headers"),
    ]

    operations = [
        migrations.AddField(
            model_name="deliverysettings",
            name="send_traceparent",
            field=models.BooleanField(
                default=False,
                help_text="Send each request with a W3C traceparent header naming its attempt's span, so "
                "that a receiver's traces join ours. Takes effect while traces are on "
                "(OTEL_EXPORTER_OTLP_ENDPOINT set).",
            ),
        ),
    ]
