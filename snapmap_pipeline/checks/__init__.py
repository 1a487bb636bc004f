"""Asset checks: the sweeper's consistency checks and the remediation of orphan photos
(``sweeper.py``), and the blocking check of each ingest run (``batch_links.py``)."""

from snapmap_pipeline.checks.sweeper import SWEEPER_CHECKS, sweeper_job, sweeper_schedule

__all__ = ["SWEEPER_CHECKS", "sweeper_job", "sweeper_schedule"]
