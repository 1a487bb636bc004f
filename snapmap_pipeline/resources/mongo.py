"""MongoDB resource: one client per run, closed on exit, with explicit timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr
from pymongo import MongoClient
from pymongo.database import Database

from snapmap_pipeline.store.schema import ensure_schema


class MongoResource(ConfigurableResource):
    """The ``photos`` and ``events`` database. The URI may hold credentials: wire it with
    ``EnvVar("MONGODB_URI")``, never in run config."""

    uri: str = Field(
        description="mongodb:// or mongodb+srv:// URI (EnvVar: it may hold a password)."
    )
    database: str = Field(default="snapmap", description="Database holding photos and events.")
    write_concern: str = Field(
        default="majority", description="'majority' in production; a number for single servers."
    )
    timeout_ms: int = Field(default=10_000, description="Server selection, connect and socket.")

    _client: MongoClient | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = None

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _make_client(self) -> MongoClient:
        w: str | int = (
            int(self.write_concern) if self.write_concern.isdigit() else self.write_concern
        )
        return MongoClient(
            self.uri,
            tz_aware=True,
            serverSelectionTimeoutMS=self.timeout_ms,
            connectTimeoutMS=self.timeout_ms,
            socketTimeoutMS=self.timeout_ms * 3,
            w=w,
            appname="snapmap-pipeline",
        )

    def db(self) -> Database:
        """The database of a client kept for the whole run (closed at teardown); indexes are
        ensured once per client."""
        if self._client is None:
            self._client = self._make_client()
            ensure_schema(self._client[self.database])
        return self._client[self.database]

    @contextmanager
    def session_db(self) -> Iterator[Database]:
        """A database handle whose client closes on exit, for use outside a run."""
        client = self._make_client()
        try:
            database = client[self.database]
            ensure_schema(database)
            yield database
        finally:
            client.close()
