"""The service's database: one SQLAlchemy engine per URL.

Embedded SQLite by default (``sqlite:///<path>``: WAL journal, foreign keys on, a busy
timeout so several processes on one machine can share the file); any SQLAlchemy URL, e.g.
``postgresql+psycopg://...``, for replicas on several nodes. Tables are created by the
modules that own them (``metadata.create_all(engine)``) on first use.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

__all__ = ["engine_for"]

_ENGINES: dict[str, Any] = {}
_LOCK = threading.Lock()


def engine_for(url: str) -> Any:
    """The process's ``sqlalchemy.Engine`` for ``url`` (created once, then shared). A SQLite
    file's folder is created; a SQLite URL without a path (in-memory) is refused because
    each connection would see its own empty database."""
    import sqlalchemy as sa

    with _LOCK:
        if url in _ENGINES:
            return _ENGINES[url]
        parsed = sa.engine.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ValueError(f"database URL {url!r}: an in-memory SQLite database is not shared; give a file path")
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 30.0})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)
        _ENGINES[url] = engine
        return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
