"""API keys per tenant (talkmesh.serving.tenants): hashes only, create/list/revoke/authenticate,
identical refusals, several processes on one SQLite file, the FastAPI dependency (401 in the one
error schema; dev mode on loopback only) and the `talkmesh keys` CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from talkmesh.serving.tenants import (
    DEV_TENANT,
    SERVICE_DB_ENV,
    AuthenticationError,
    KeyStore,
    KeyStoreError,
    Principal,
    UnknownKeyError,
    default_db_url,
    tenant_dependency,
)


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path / 'service.db'}"


@pytest.fixture
def store(db_url):
    return KeyStore(db_url)


def test_only_hashes_are_stored(store, tmp_path):
    key_id, token = store.create("acme", "ci")
    assert token.startswith(f"tmk_{key_id}_") and len(token) == 4 + 16 + 1 + 43
    assert store.authenticate(token) == Principal("acme", key_id)
    secret = token[len(f"tmk_{key_id}_") :]
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("service.db*"))  # the file and its WAL
    assert token.encode() not in raw and secret.encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw and key_id.encode() in raw


def test_create_list_revoke_authenticate(store):
    a1, t1 = store.create("acme", "laptop")
    a2, t2 = store.create("acme")
    b1, _ = store.create("beta-2", "ci")
    assert len({t1, t2}) == 2
    assert [r.key_id for r in store.list("acme")] == [a1, a2]
    assert {r.key_id for r in store.list()} == {a1, a2, b1}
    rec = store.list("beta-2")[0]
    assert (rec.tenant, rec.label, rec.revoked, rec.last_used) == ("beta-2", "ci", False, None)
    assert "token" not in json.dumps(rec.as_dict()) and "sha" not in json.dumps(rec.as_dict())

    assert store.authenticate(t1).tenant == "acme"
    assert store.get(a1).last_used is not None
    revoked = store.revoke(a1)
    assert revoked.revoked and store.revoke(a1).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(AuthenticationError):
        store.authenticate(t1)
    assert store.authenticate(t2) == Principal("acme", a2)  # the tenant's other key still works
    with pytest.raises(UnknownKeyError, match="no such key"):
        store.revoke("0123456789abcdef")
    with pytest.raises(UnknownKeyError, match="of tenant 'acme'"):
        store.revoke(b1, tenant="acme")  # a key of another tenant is not revoked through this one
    assert not store.get(b1).revoked


def test_refusals_are_identical(store):
    key_id, token = store.create("acme")
    revoked_id, revoked_token = store.create("acme")
    store.revoke(revoked_id)
    secret = token[len(f"tmk_{key_id}_") :]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    bad = [
        "", "x", "Bearer " + token, token + "x", token.upper(), token[:-1], "tmk_" + "0" * 16 + "_" + secret,
        f"tmk_{key_id}_{flipped}", revoked_token, "tmk_" + "x" * 10_000, "tmk_\x00", None, 42,
    ]
    messages = set()
    for candidate in bad:
        with pytest.raises(AuthenticationError) as e:
            store.authenticate(candidate)
        messages.add(str(e.value))
    assert messages == {"invalid or revoked API key"}


@pytest.mark.parametrize(
    "tenant", ["", "Acme", "a b", "-acme", "a/b", "../x", "a" * 64, "acmé", "acme\n", None, DEV_TENANT]
)
def test_tenant_names_are_validated(store, tenant):
    with pytest.raises(KeyStoreError, match="tenant") as e:
        store.create(tenant)
    assert ("reserved" if tenant == DEV_TENANT else "lowercase letters") in str(e.value)


def test_labels_and_urls_are_validated(store, tmp_path):
    with pytest.raises(KeyStoreError, match="label"):
        store.create("acme", "x" * 201)
    with pytest.raises(KeyStoreError, match="label"):
        store.create("acme", "line\nbreak")
    for url, why in [("sqlite://", "in-memory"), ("not a url", "expected a SQLAlchemy URL"), ("nope://x", "nope")]:
        with pytest.raises(KeyStoreError, match=why):
            KeyStore(url)


def test_default_db_url(monkeypatch, tmp_path):
    monkeypatch.delenv(SERVICE_DB_ENV, raising=False)
    monkeypatch.setenv("TALKMESH_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # not the working directory: a Ray process building the app has another
    assert default_db_url() == f"sqlite:///{(tmp_path / 'home').resolve() / 'service.db'}"
    monkeypatch.setenv(SERVICE_DB_ENV, "postgresql+psycopg://svc@db.internal/talkmesh")
    assert default_db_url() == "postgresql+psycopg://svc@db.internal/talkmesh"


_CHILD = textwrap.dedent(
    """
    import json, sys
    from talkmesh.serving.tenants import AuthenticationError, KeyStore
    url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = KeyStore(url)
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the parent writes at the same time
    try:
        seen = store.authenticate(token).tenant
    except AuthenticationError:
        seen = None
    made = [store.create("child", str(i)) for i in range(count)]
    print(json.dumps({"seen": seen, "made": made}))
    """
)


def _child(db_url: str, token: str, count: int = 0) -> subprocess.Popen:
    """A second process with its own KeyStore on ``db_url``, started and waiting for "go"."""
    argv = [sys.executable, "-c", _CHILD, db_url, token, str(count)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def _run(child: subprocess.Popen) -> dict:
    out, _ = child.communicate("go\n", timeout=120)
    assert child.returncode == 0
    return json.loads(out)


def test_two_processes_share_one_sqlite_file(db_url):
    """A fresh database (the table created concurrently), keys written by two processes at
    once, and each process sees the other's keys and revocations at once."""
    child = _child(db_url, "tmk_" + "0" * 16 + "_" + "A" * 43, count=30)
    parent = KeyStore(db_url)
    child.stdin.write("go\n")
    child.stdin.flush()
    mine = [parent.create("parent", str(i)) for i in range(30)]
    made = _run(child)["made"]
    assert {r.key_id for r in parent.list()} == {k for k, _ in mine + made}
    assert parent.authenticate(made[0][1]) == Principal("child", made[0][0])

    parent.revoke(mine[0][0])
    assert _run(_child(db_url, mine[0][1]))["seen"] is None
    assert _run(_child(db_url, mine[1][1]))["seen"] == "parent"


def test_two_engines_see_each_others_writes(db_url):
    """Two engines on one file (as two replicas would hold): a revocation by one is refused by the other."""
    import sqlalchemy as sa

    a = KeyStore(db_url)
    b = KeyStore(db_url)
    b.engine = sa.create_engine(db_url)  # a separate engine and pool, not the process's shared one
    key_id, token = a.create("acme")
    assert b.authenticate(token).key_id == key_id
    b.revoke(key_id)
    with pytest.raises(AuthenticationError):
        a.authenticate(token)
    b.engine.dispose()


def _app(store, dev_mode):
    from fastapi import Depends, FastAPI

    from talkmesh.serving.errors import ServiceError, error_response

    app = FastAPI()

    async def answer(_request, exc):  # what the service's error handlers do for a ServiceError
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    app.add_exception_handler(ServiceError, answer)
    who = tenant_dependency(store, dev_mode)

    @app.get("/whoami")
    def whoami(p: Principal = Depends(who)) -> dict:  # noqa: B008
        return {"tenant": p.tenant, "key_id": p.key_id, "dev": p.dev}

    return app


def _client(app, host="203.0.113.7"):
    from fastapi.testclient import TestClient

    return TestClient(app, client=(host, 50000))


def test_dependency_answers_401_in_the_error_schema(store):
    key_id, token = store.create("acme")
    revoked_id, revoked = store.create("acme")
    store.revoke(revoked_id)
    client = _client(_app(store, dev_mode=False))
    assert client.get("/whoami", headers={"Authorization": f"Bearer {token}"}).json() == {
        "tenant": "acme", "key_id": key_id, "dev": False}
    assert client.get("/whoami", headers={"X-API-Key": token}).json()["tenant"] == "acme"

    cases = [
        ({}, "Authorization", "API key is required"),
        ({"Authorization": f"Basic {token}"}, "Authorization", "Bearer"),
        ({"Authorization": "Bearer"}, "Authorization", "Bearer"),
        ({"Authorization": "Bearer nonsense"}, "Authorization", "invalid or revoked API key"),
        ({"Authorization": f"Bearer {revoked}"}, "Authorization", "invalid or revoked API key"),
        ({"X-API-Key": revoked}, "X-API-Key", "invalid or revoked API key"),
        ({"Authorization": f"Bearer {token}", "X-API-Key": revoked}, "X-API-Key", "different keys"),
    ]
    for headers, field, message in cases:
        r = client.get("/whoami", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
        assert body["error"]["code"] == "unauthenticated" and body["error"]["field"] == field
        assert message in body["error"]["message"]
        assert "X-Talkmesh-Auth" not in r.headers


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_dev_mode_only_on_loopback(store, host):
    key_id, token = store.create("acme")
    local = _client(_app(store, dev_mode=True), host=host)
    r = local.get("/whoami")
    assert r.json() == {"tenant": DEV_TENANT, "key_id": None, "dev": True}
    assert r.headers["X-Talkmesh-Auth"] == "dev-mode"
    r = local.get("/whoami", headers={"Authorization": f"Bearer {token}"})  # a key given is still checked
    assert r.json()["tenant"] == "acme" and "X-Talkmesh-Auth" not in r.headers
    assert local.get("/whoami", headers={"X-API-Key": "wrong"}).status_code == 401

    for remote in ["203.0.113.7", "10.0.0.1", "127.0.0.1.evil", "::ffff:127.0.0.2"]:
        r = _client(_app(store, dev_mode=True), host=remote).get("/whoami", headers={"X-Forwarded-For": "127.0.0.1"})
        assert r.status_code == 401 and "loopback only" in r.json()["error"]["message"]
    assert _client(_app(store, dev_mode=False), host=host).get("/whoami").status_code == 401


def test_dev_mode_without_a_store():
    local = _client(_app(None, dev_mode=True), host="127.0.0.1")
    assert local.get("/whoami").json()["tenant"] == DEV_TENANT
    r = local.get("/whoami", headers={"X-API-Key": "tmk_x"})
    assert r.status_code == 401 and "checks no API key" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="KeyStore is needed"):
        tenant_dependency(None, dev_mode=False)


def test_cli_round_trip(db_url, capsys):
    from talkmesh.cli import main

    assert main(["keys", "create", "--tenant", "acme", "--label", "ci", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "cannot be shown again" in out
    token = next(w for w in out.split() if w.startswith("tmk_"))
    key_id = token.split("_")[1]
    assert KeyStore(db_url).authenticate(token).tenant == "acme"

    assert main(["keys", "list", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert key_id in out and "acme" in out and "ci" in out and token not in out
    assert main(["keys", "list", "--tenant", "acme", "--json", "--db", db_url]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["key_id"], k["revoked"]) for k in listed] == [(key_id, False)]

    assert main(["keys", "revoke", key_id, "--db", db_url]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", key_id, "--db", db_url]) == 0  # idempotent
    capsys.readouterr()
    assert main(["keys", "list", "--json", "--db", db_url]) == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked"] is True

    for argv, why in [
        (["keys", "create", "--tenant", "Bad Name", "--db", db_url], "tenant 'Bad Name'"),
        (["keys", "revoke", "ffffffffffffffff", "--db", db_url], "no such key"),
        (["keys", "list", "--db", "sqlite://"], "in-memory"),
    ]:
        assert main(argv) == 2
        assert why in capsys.readouterr().err


def test_cli_default_db_is_the_services(monkeypatch, tmp_path, capsys):
    from talkmesh.cli import main

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv(SERVICE_DB_ENV, url)
    assert main(["keys", "create", "--tenant", "acme"]) == 0
    capsys.readouterr()
    assert [r.tenant for r in KeyStore(default_db_url()).list()] == ["acme"]
