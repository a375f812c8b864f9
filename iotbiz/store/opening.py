"""Which store the settings name: the PostgreSQL database of `store.url` when it is set, else
the SQLite file of `store.path`. The platform and the CLI open their store here and nowhere
else, so both backends are chosen by the same rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from iotbiz.settings import StoreSettings

if TYPE_CHECKING:
    from iotbiz.store.interface import PlatformStore


def store_name(settings: StoreSettings) -> str:
    """The store as messages name it: the file, or the URL without its password."""
    if settings.url:
        from iotbiz.store.postgres.core import redact

        return redact(settings.url)
    return str(settings.path)


async def open_store(settings: StoreSettings, *, create: bool = True) -> PlatformStore:
    """Open (and migrate) the store. `create=False`: a missing SQLite file is a StoreNotFound
    (a PostgreSQL database is never created here: its server's administrator makes it)."""
    if settings.url:
        # Imported here: asyncpg is a platform dependency, not needed for a SQLite store.
        from iotbiz.store.postgres import PostgresStore

        return await PostgresStore.open(settings.url)
    from iotbiz.store import Store

    return await Store.open(settings.path, create=create)
