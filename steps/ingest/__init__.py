"""Ingest: raw records from files, folders, object storage or built-in corpora into the store
(``ingest_records``, steps/ingest/step.py)."""

from steps.ingest.step import ingest_records

__all__ = ["ingest_records"]
