"""Known senders: the API keys senders present at ingestion, stored as SHA-256 digests only."""

import hashlib
import secrets

from django.core.validators import MinValueValidator
from django.db import models

# Every key starts with this, so that a key pasted where it should not be is recognisable.
KEY_PREFIX = "pbk_"
# Characters of a key kept in clear to tell keys apart (the prefix and 8 of 43 random ones).
SHOWN_LENGTH = len(KEY_PREFIX) + 8


def hash_key(key: str) -> str:
    """The key's SHA-256, in hex: a key carries 256 random bits, so a fast hash is enough
    (there is nothing to guess that a slow one would protect)."""
    return hashlib.sha256(key.encode()).hexdigest()


class SenderKey(models.Model):
    """One sender's API key. The key is shown once, when issued; the row keeps its digest."""

    name = models.CharField(max_length=200, help_text="Who sends with this key.")
    prefix = models.CharField(max_length=SHOWN_LENGTH, editable=False, help_text="The key's first characters.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    active = models.BooleanField(default=True, help_text="Untick to revoke: the key is then refused with 401.")
    created_at = models.DateTimeField(auto_now_add=True)
    rate_limit = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Requests per second this key may send (up to that many at once). "
        "Empty: INGEST_RATE_LIMIT_PER_KEY. 0: no limit.",
    )

    # The key itself, set only on the instance that issued it (for admin to show once); not a field.
    issued_key: str = ""

    class Meta:
        verbose_name = "sender key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    def issue_key(self) -> str:
        """A new random key for this row: its digest and prefix are set, the key returned."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        self.key_hash = hash_key(key)
        self.prefix = key[:SHOWN_LENGTH]
        self.issued_key = key
        return key
