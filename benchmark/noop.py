"""The job of the queue-ceiling baseline: RQ's fixed cost per job, with no work inside."""


def noop() -> None:
    """Does nothing; imports nothing (the stock `rq worker` imports this module, not Django)."""
