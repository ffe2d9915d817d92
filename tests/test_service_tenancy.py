"""Tenants of the style service: API keys on every /v1 route, styles that belong to the tenant
that stored them (another tenant's style answers exactly like a missing one, with or without
its id), revoked keys refused, every refusal in the one error schema; and the mapping of a full
adaptation queue to 503/429 with ``Retry-After`` (fast). One Serve application from a local
method directory on 127.0.0.1 (slow), on the session's local Ray."""

from __future__ import annotations

import pytest

from service_helpers import ERROR_KEYS, npy, wav
from talkmesh.serving.jobs import QueueFull, TenantQuotaExceeded


def _error(r, status: int, code: str | None = None) -> dict:
    """The body of an error response, checked against the one schema."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_a_full_queue_is_503_and_a_tenant_over_its_quota_429_with_retry_after():
    from talkmesh.serving.settings import queue_error as _queue_error

    full = _queue_error(QueueFull("the adaptation queue is full", 12))
    assert (full.status, full.code, full.headers) == (503, "queue_full", {"Retry-After": "12"})
    quota = _queue_error(TenantQuotaExceeded("this tenant already has 10 adaptations waiting", 3))
    assert (quota.status, quota.code, quota.headers["Retry-After"]) == (429, "tenant_quota_exceeded", "3")
    assert full.body() == {"error": {"code": "queue_full", "message": "the adaptation queue is full", "field": None}}


@pytest.fixture(scope="module")
def keyed(serve_url, tmp_path_factory):
    """A debug FaceFormer (local method directory) served with keys required (no dev mode),
    and keys for tenants alice (two) and bob in the service database."""
    from ray import serve

    from service_helpers import start_service

    svc = start_service(serve_url, tmp_path_factory.mktemp("tenancy"), "tenancy", ("alice", "bob"))
    tokens = {**svc.tokens, "alice2": svc.keys.create("alice")[1]}
    yield {"url": svc.url, "keys": svc.keys, "tokens": tokens, "reference": svc.reference}
    serve.delete("tenancy")


@pytest.mark.slow
def test_tenants_cannot_see_use_or_delete_each_others_styles(keyed):
    import requests

    url, ref, tokens = keyed["url"], keyed["reference"], keyed["tokens"]

    def call(method: str, path: str, who: str | None, **kw):
        headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
        return requests.request(method, f"{url}{path}", headers=headers, timeout=120, **kw)

    assert call("GET", "/healthz", None).status_code == 200  # no key needed
    for path in ("/v1/info", "/v1/styles", "/v1/styles/sty_000000000000000000000000"):
        err = _error(call("GET", path, None), 401, "unauthenticated")
        assert err["field"] == "Authorization" and "API key" in err["message"]
    refused = requests.get(f"{url}/v1/styles", headers={"X-API-Key": "tmk_0123456789abcdef_" + "x" * 43}, timeout=30)
    assert _error(refused, 401)["message"] == "invalid or revoked API key"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert call("GET", "/v1/info", "bob").json()["tenant"] == "bob"
    big = {"audio": ("a.wav", b"\0" * (14 * 2**20))}  # over the body limit: 3 files x 4 MiB + 1 MiB
    assert _error(call("POST", "/v1/animate", "bob", files=big), 413, "too_large")["field"] == "body"

    files = {"audio": ("r.wav", wav(ref.audio)), "motion": ("m.npy", npy(ref.vertices))}
    files["template"] = ("t.npy", npy(ref.template))
    r = call("POST", "/v1/styles", "alice", files=files, data={"name": "alice's voice"})
    assert r.status_code == 201, r.text
    sid = r.json()["style_id"]
    assert "X-Talkmesh-Auth" not in r.headers  # keys, not development mode
    assert call("GET", f"/v1/styles/{sid}", "alice").json()["status"] == "ready"
    page = call("GET", "/v1/styles", "alice", params={"limit": 1}).json()
    assert [s["style_id"] for s in page["styles"]] == [sid] and page["next_cursor"] is None
    assert _error(call("GET", "/v1/styles", "alice", params={"cursor": "garbage!"}), 422)["field"] == "cursor"

    # Bob: alice's style is indistinguishable from one that does not exist.
    missing = "sty_000000000000000000000000"
    assert call("GET", "/v1/styles", "bob").json()["styles"] == []
    for method in ("GET", "DELETE"):
        theirs, absent = (
            _error(call(method, f"/v1/styles/{sid}", "bob"), 404),
            _error(call(method, f"/v1/styles/{missing}", "bob"), 404),
        )
        assert theirs == {**absent, "message": absent["message"].replace(missing, sid)}
    audio = {"audio": ("a.wav", wav(ref.audio[:32000]))}
    used = _error(call("POST", "/v1/animate", "bob", files=audio, data={"style_id": sid}), 404)
    unknown = _error(call("POST", "/v1/animate", "bob", files=audio, data={"style_id": missing}), 404)
    assert used == {**unknown, "message": unknown["message"].replace(missing, sid)}
    # Bob posting the very same clip gets a style of his own: an id reveals nothing across tenants.
    mine = call("POST", "/v1/styles", "bob", files=files)
    assert mine.status_code == 201 and mine.json()["style_id"] != sid, mine.text
    assert call("POST", "/v1/animate", "alice", files=audio, data={"style_id": sid}).status_code == 200
    # This model directory carries no templates: audio alone is a 422 that says to send one.
    info = call("GET", "/v1/info", "bob").json()
    assert info["templates"] == [] and info["default_template"] is False
    bare = _error(call("POST", "/v1/animate", "bob", files=audio), 422, "cannot_animate")
    assert "carries no templates" in bare["message"]

    # A revoked key is refused at once; the tenant's other key still works (and deletes).
    keyed["keys"].revoke(tokens["alice"].split("_")[1])
    assert _error(call("GET", f"/v1/styles/{sid}", "alice"), 401)["message"] == "invalid or revoked API key"
    assert call("GET", f"/v1/styles/{sid}", "alice2").status_code == 200
    assert call("DELETE", f"/v1/styles/{sid}", "alice2").status_code == 204
    _error(call("GET", f"/v1/styles/{sid}", "alice2"), 404, "not_found")
    gone = call("POST", "/v1/animate", "alice2", files=audio, data={"style_id": sid})
    assert _error(gone, 404)["field"] == "style_id"  # the replica's cached style is not served
