"""Tenants and their API keys: who is calling the style service.

A tenant is a customer account, named by a slug (see :data:`TENANT_PATTERN`). Each tenant
holds any number of API keys. A key is shown once, when it is created, as a token::

    tmk_<key id: 16 hex>_<secret: 43 url-safe base64 characters, 256 random bits>

The recognisable ``tmk_`` prefix lets secret scanners and people spot a leaked token; the
key id in it lets the service find the key's row without a table scan and lets an
operator revoke it (``talkmesh keys revoke <key id>``). Only the SHA-256 of the token is
stored: a fast hash suffices for 256 random bits (a slow password hash protects guessable
secrets; these are not), and a stolen database yields no usable token. Checks compare
hashes in constant time, and a malformed, unknown or revoked token gets the same answer.

Keys live in the service database (:func:`talkmesh.serving.db.engine_for`): embedded SQLite
by default (:func:`default_db_url`), any SQLAlchemy URL (PostgreSQL for replicas on several
nodes). Every check reads the database, so a revocation takes effect on every replica and
process at once. The table is created on first use.

The service reads the key from ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``
through the FastAPI dependency of :func:`tenant_dependency`. Development mode (``dev_mode``)
accepts requests without a key, but only from the loopback addresses ``127.0.0.1`` and
``::1``: such a request acts as tenant ``dev`` (a reserved name) and its response carries
the header ``X-Talkmesh-Auth: dev-mode``. The address checked is the TCP peer's, never
``X-Forwarded-For``; behind a reverse proxy on the same host every request looks local, so
such a deployment must not set ``dev_mode``.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the dependency
# that tenant_dependency returns at run time, and they name classes imported in that function.
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from talkmesh.serving.db import engine_for
from talkmesh.serving.errors import ServiceError, code_for_status

__all__ = [
    "DEV_TENANT",
    "SERVICE_DB_ENV",
    "TENANT_PATTERN",
    "TOKEN_PREFIX",
    "AuthenticationError",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "Principal",
    "UnknownKeyError",
    "default_db_url",
    "tenant_dependency",
    "validate_tenant",
]

log = logging.getLogger(__name__)

SERVICE_DB_ENV = "TALKMESH_SERVICE_DB"
TOKEN_PREFIX = "tmk_"
DEV_TENANT = "dev"
TENANT_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
TENANT_RULE = (
    "1 to 63 characters: lowercase letters a-z, digits, '-' and '_', starting with a letter or digit"
)
MAX_LABEL = 200
LOOPBACK = frozenset({"127.0.0.1", "::1"})
DEV_HEADER = "X-Talkmesh-Auth"
LAST_USED_RESOLUTION_S = 60.0  # last_used is written at most this often per key (a write per request is waste)

_TENANT_RE = re.compile(rf"^{TENANT_PATTERN}\Z")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
_TOKEN_RE = re.compile(rf"^{TOKEN_PREFIX}([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})\Z")
_MAX_TOKEN = 256
_REFUSED = "invalid or revoked API key"


class KeyStoreError(ValueError):
    """A bad argument to the key store (tenant name, label, key id) or an unusable database URL."""


class UnknownKeyError(KeyStoreError, LookupError):
    """No API key has this id (or it belongs to another tenant than the one named)."""


class AuthenticationError(Exception):
    """A token was refused. The message is the same for every reason (malformed, unknown,
    revoked), so a caller learns nothing about which keys exist."""

    def __init__(self) -> None:
        super().__init__(_REFUSED)


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts for: the tenant and the key that proved it (``None`` in dev mode)."""

    tenant: str
    key_id: str | None
    dev: bool = False


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """An API key as listed: everything but the secret. Times are Unix seconds."""

    key_id: str
    tenant: str
    label: str
    created: float
    last_used: float | None
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        """Whether the key is refused."""
        return self.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``revoked`` included)."""
        return {**dataclasses.asdict(self), "revoked": self.revoked}


def default_db_url() -> str:
    """The service database the CLI and the service share: ``$TALKMESH_SERVICE_DB`` if set,
    else the SQLite file ``service.db`` under :func:`talkmesh.serving.store.default_base`
    (``$TALKMESH_HOME``, default ``~/.local/share/talkmesh``, next to the default style
    store): the same file for ``talkmesh keys`` and for a service deployed with ``serve
    deploy``, whose application is built in a Ray process with another working directory."""
    from talkmesh.serving.store import default_base

    url = os.environ.get(SERVICE_DB_ENV, "").strip()
    return url or f"sqlite:///{default_base() / 'service.db'}"


def validate_tenant(tenant: Any, *, allow_dev: bool = False) -> str:
    """``tenant`` if it is a valid tenant name, else a :class:`KeyStoreError` saying what is
    allowed. ``dev`` is reserved for development mode's keyless requests (a key for it would
    let a remote client act on what was made locally without one)."""
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
        raise KeyStoreError(f"tenant {tenant!r}: expected {TENANT_RULE}")
    if tenant == DEV_TENANT and not allow_dev:
        raise KeyStoreError(f"tenant {tenant!r}: reserved for development mode (requests without a key)")
    return tenant


def _validate_label(label: Any) -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL or not label.isprintable():
        raise KeyStoreError(f"label {label!r}: expected printable text of at most {MAX_LABEL} characters")
    return label


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _tables() -> tuple[Any, Any]:
    """(metadata, the ``api_keys`` table). Built per store, not at import, so importing this
    module does not import SQLAlchemy."""
    import sqlalchemy as sa

    metadata = sa.MetaData()
    table = sa.Table(
        "api_keys",
        metadata,
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False, index=True),
        sa.Column("label", sa.String(MAX_LABEL), nullable=False, default=""),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("last_used", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    return metadata, table


class KeyStore:
    """API keys per tenant in the service database at ``url`` (any SQLAlchemy URL; a SQLite
    file by default). Safe for several threads and processes: every method is one short
    transaction, and rows are never rewritten except for ``last_used`` and ``revoked_at``."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        try:
            self.url = sa.engine.make_url(url).render_as_string(hide_password=True)  # for messages and logs
        except sa.exc.ArgumentError:
            raise KeyStoreError("database URL: expected a SQLAlchemy URL, e.g. sqlite:////srv/talkmesh/service.db "
                                "or postgresql+psycopg://user@host/talkmesh") from None
        try:
            self.engine = engine_for(url)
        except ValueError as e:  # engine_for names the URL
            raise KeyStoreError(str(e)) from None
        except ImportError as e:
            raise KeyStoreError(f"database URL {self.url!r}: its driver is not installed ({e})") from None
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, OSError) as e:
            raise KeyStoreError(f"database URL {self.url!r}: {e}") from None
        self._metadata, self._table = _tables()
        self._ready = False
        self._lock = threading.Lock()
        # Hashed against when the key id is unknown, so that path costs what a known id costs.
        self._decoy = _hash(TOKEN_PREFIX + secrets.token_urlsafe(32))

    def ping(self) -> None:
        """Raise when the database does not answer (the ingress's health check)."""
        import sqlalchemy as sa

        with self._begin() as conn:
            conn.execute(sa.text("SELECT 1"))

    def _begin(self) -> Any:
        """A transaction on the engine, the table created first (once per store)."""
        if not self._ready:
            self._create_table()
        return self.engine.begin()

    def _create_table(self) -> None:
        import sqlalchemy as sa
        from sqlalchemy.schema import CreateIndex, CreateTable

        with self._lock:
            if self._ready:
                return
            try:
                with self.engine.begin() as conn:
                    conn.execute(CreateTable(self._table, if_not_exists=True))
                    for index in self._table.indexes:
                        conn.execute(CreateIndex(index, if_not_exists=True))
            except sa.exc.SQLAlchemyError as e:
                # Another process may have created it between our check and our CREATE.
                if not sa.inspect(self.engine).has_table(self._table.name):
                    raise KeyStoreError(f"database {self.url}: cannot create the API key table: {e}") from e
            self._ready = True

    def create(self, tenant: str, label: str = "") -> tuple[str, str]:
        """A new key for ``tenant``: ``(key_id, token)``. The token is not stored and cannot
        be recovered; give it to the client now."""
        validate_tenant(tenant)
        _validate_label(label)
        key_id = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        row = {"key_id": key_id, "tenant": tenant, "label": label, "token_sha256": _hash(token), "created": time.time()}
        with self._begin() as conn:
            conn.execute(self._table.insert().values(**row))
        log.info("created API key %s for tenant %s", key_id, tenant)
        return key_id, token

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        """The keys of ``tenant`` (every tenant's if ``None``), oldest first, without secrets."""
        t = self._table
        query = t.select().order_by(t.c.tenant, t.c.created, t.c.key_id)
        if tenant is not None:
            query = query.where(t.c.tenant == validate_tenant(tenant, allow_dev=True))
        with self._begin() as conn:
            return [_record(r) for r in conn.execute(query).mappings()]

    def get(self, key_id: str) -> KeyRecord:
        """The key ``key_id`` (an :class:`UnknownKeyError` if there is none)."""
        with self._begin() as conn:
            row = self._row(conn, key_id)
        if row is None:
            raise UnknownKeyError(f"API key {key_id!r}: no such key (`talkmesh keys list` shows the ids)")
        return _record(row)

    def revoke(self, key_id: str, tenant: str | None = None) -> KeyRecord:
        """Refuse the key ``key_id`` from now on, on every replica. Revoking a revoked key
        changes nothing (its first revocation time stays). An unknown id, or a key of another
        tenant than ``tenant`` when given, is an :class:`UnknownKeyError`."""
        t = self._table
        with self._begin() as conn:
            row = self._row(conn, key_id)
            if row is None or (tenant is not None and row["tenant"] != validate_tenant(tenant, allow_dev=True)):
                owner = f" of tenant {tenant!r}" if tenant is not None else ""
                raise UnknownKeyError(f"API key {key_id!r}: no such key{owner} (`talkmesh keys list` shows the ids)")
            if row["revoked_at"] is None:
                now = time.time()
                conn.execute(t.update().where(t.c.key_id == key_id, t.c.revoked_at.is_(None)).values(revoked_at=now))
                row = self._row(conn, key_id)
                log.info("revoked API key %s of tenant %s", key_id, row["tenant"])
        return _record(row)

    def authenticate(self, token: str) -> Principal:
        """The tenant and key that ``token`` proves, or an :class:`AuthenticationError` (the
        same one whether the token is malformed, unknown or revoked). Hashes are compared in
        constant time; an unknown id is compared against a decoy hash."""
        match = _TOKEN_RE.match(token) if isinstance(token, str) and len(token) <= _MAX_TOKEN else None
        if match is None:
            raise AuthenticationError()
        key_id = match.group(1)
        with self._begin() as conn:
            row = self._row(conn, key_id)
        stored = row["token_sha256"] if row is not None else self._decoy
        if not hmac.compare_digest(_hash(token), stored) or row is None or row["revoked_at"] is not None:
            raise AuthenticationError()
        self._touch(key_id, row["last_used"])
        return Principal(tenant=row["tenant"], key_id=key_id)

    def _row(self, conn: Any, key_id: str) -> Any:
        if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
            return None
        return conn.execute(self._table.select().where(self._table.c.key_id == key_id)).mappings().first()

    def _touch(self, key_id: str, last_used: float | None) -> None:
        """Record that the key was used (at most every LAST_USED_RESOLUTION_S); a failure here
        (a busy database) is logged and does not refuse the request."""
        import sqlalchemy as sa

        now = time.time()
        if last_used is not None and now - last_used < LAST_USED_RESOLUTION_S:
            return
        t = self._table
        stale = sa.or_(t.c.last_used.is_(None), t.c.last_used < now - LAST_USED_RESOLUTION_S)
        try:
            with self.engine.begin() as conn:
                conn.execute(t.update().where(t.c.key_id == key_id, stale).values(last_used=now))
        except sa.exc.SQLAlchemyError as e:
            log.warning("API key %s: could not record its use: %s", key_id, e)


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        tenant=row["tenant"],
        label=row["label"],
        created=row["created"],
        last_used=row["last_used"],
        revoked_at=row["revoked_at"],
    )


def _credentials(headers: Any) -> tuple[str | None, str]:
    """(token or None, the header it came from) of ``Authorization: Bearer`` / ``X-API-Key``.
    Both headers with different values, or an Authorization scheme other than Bearer, are
    refused rather than guessed at."""
    auth, api_key = headers.get("authorization"), headers.get("x-api-key")
    bearer = None
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("Authorization: expected 'Bearer <API key>'", "Authorization")
        bearer = value.strip()
    if bearer is not None and api_key is not None and api_key.strip() != bearer:
        raise _unauthorized("Authorization and X-API-Key carry different keys; send one", "X-API-Key")
    if bearer is not None:
        return bearer, "Authorization"
    return (api_key.strip() if api_key is not None else None), "X-API-Key"


def _unauthorized(message: str, field: str | None) -> ServiceError:
    headers = {"WWW-Authenticate": 'Bearer realm="talkmesh"'}
    return ServiceError(401, code_for_status(401), message, field, headers=headers)


def tenant_dependency(store: KeyStore | None, dev_mode: bool) -> Callable[..., Principal]:
    """A FastAPI dependency that answers "who is calling" as a :class:`Principal`, or raises a
    :class:`ServiceError` 401 (code ``unauthenticated``; with
    :func:`talkmesh.serving.errors.install_error_handlers` on the app it is answered in the
    one error schema).

    A key in ``Authorization: Bearer <token>`` or ``X-API-Key: <token>`` is checked against
    ``store``. Without one, ``dev_mode`` admits a loopback client (127.0.0.1, ::1) as tenant
    ``dev`` and marks the response ``X-Talkmesh-Auth: dev-mode``. ``store`` may be ``None``
    only in dev mode (then only loopback clients without a key are served). The dependency is
    a plain function, so FastAPI runs its database read in the thread pool, off the event loop.
    """
    from fastapi import Request, Response

    if store is None and not dev_mode:
        raise ValueError("tenant_dependency: a KeyStore is needed unless dev_mode is set")

    def principal(request: Request, response: Response) -> Principal:
        token, field = _credentials(request.headers)
        if token is None:
            host = request.client.host if request.client else None
            if dev_mode and host in LOOPBACK:
                response.headers[DEV_HEADER] = "dev-mode"
                return Principal(tenant=DEV_TENANT, key_id=None, dev=True)
            local = " (development mode admits keyless requests from loopback only)" if dev_mode else ""
            raise _unauthorized(f"an API key is required: send 'Authorization: Bearer <key>'{local}", "Authorization")
        if store is None:
            raise _unauthorized("this service runs in development mode without keys; it checks no API key", field)
        try:
            return store.authenticate(token)
        except AuthenticationError as e:
            raise _unauthorized(str(e), field) from None

    return principal
