from django.apps import AppConfig


class IngestionConfig(AppConfig):
    name = "ingestion"
    verbose_name = "Ingestion"

    def ready(self) -> None:
        # checks registers the system checks; senders, the signal that forgets cached keys.
        from ingestion import checks, senders  # noqa: F401
