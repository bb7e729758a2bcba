"""The official Python client (`braintrust-api`) against a live keygate admin listener.

Run by tests/official_client.rs with KEYGATE_ADMIN_URL, KEYGATE_ADMIN_KEY and KEYGATE_CA set.
Every call goes through the client unmodified; if one fails, keygate is wrong, not the client.
Prints one line per check and a closing 'N passed, N failed' line; exits non-zero on any failure.
Never prints a key or secret value.
"""

import os
import sys
import traceback

import httpx
import braintrust_api
from braintrust_api import Braintrust

BASE = os.environ["KEYGATE_ADMIN_URL"]
KEY = os.environ["KEYGATE_ADMIN_KEY"]
CA = os.environ["KEYGATE_CA"]

# keygate's admin API is rate limited (the test sets 10/s, burst 20): the client's own
# retry-on-429 (honouring Retry-After) has to carry this script through.
statuses = []


missing_retry_after = []


def _record(response):
    statuses.append(response.status_code)
    if response.status_code == 429 and not (
        response.headers.get("retry-after", "").isdigit() and "ratelimit-policy" in response.headers
    ):
        missing_retry_after.append(dict(response.headers))


client = Braintrust(
    api_key=KEY,
    base_url=BASE,
    http_client=httpx.Client(verify=CA, event_hooks={"response": [_record]}),
    max_retries=4,
)

results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append((name, None))
            print(f"ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            results.append((name, e))
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        return fn

    return wrap


def expect_status(status, fn):
    try:
        fn()
    except braintrust_api.APIStatusError as e:
        assert e.status_code == status, f"expected {status}, got {e.status_code}"
        return
    raise AssertionError(f"expected HTTP {status}, the call succeeded")


@check("api_key create / list with auto-pagination / retrieve / delete")
def _():
    made = []
    for i in range(5):
        k = client.api_keys.create(name=f"py-key-{i}")
        assert k.key.startswith("sk-") and len(k.key) == 51
        assert k.preview_name.startswith("sk-") and k.key not in k.preview_name
        assert k.org_id and k.user_id and k.created is not None
        made.append(k.id)
    listed = [k.id for k in client.api_keys.list(limit=2)]  # iterates every page
    assert all(i in listed for i in made), "a created key is missing from the paged list"
    assert len(listed) == len(set(listed)), "a key was listed twice across pages"
    first_page = client.api_keys.list(limit=2)
    assert len(first_page.objects) == 2
    assert [o.id for o in first_page.objects] == [made[4], made[3]], "not newest first"
    one = client.api_keys.retrieve(made[0])
    assert one.id == made[0] and one.name == "py-key-0"
    assert not hasattr(one, "key") or getattr(one, "key", None) is None
    by_name = client.api_keys.list(api_key_name="py-key-3").objects
    assert [o.id for o in by_name] == [made[3]]
    by_ids = client.api_keys.list(ids=[made[1], made[2]]).objects
    assert sorted(o.id for o in by_ids) == sorted([made[1], made[2]])
    deleted = client.api_keys.delete(made[0])
    assert deleted.id == made[0]
    expect_status(404, lambda: client.api_keys.retrieve(made[0]))
    for i in made[1:]:
        client.api_keys.delete(i)


@check("ai_secret life cycle")
def _():
    s = client.ai_secrets.create(name="PY_OPENAI", type="openai", secret="sk-py-secret-000001",
                                 metadata={"models": ["a"], "nested": {"x": 1}})
    assert s.name == "PY_OPENAI" and s.type == "openai"
    assert s.preview_secret and "000001" not in s.preview_secret[:-4]
    again = client.ai_secrets.create(name="PY_OPENAI", type="anthropic", secret="other-value-999999")
    assert again.id == s.id and again.type == "openai" and again.preview_secret == s.preview_secret, \
        "POST on an existing name must return it unmodified"
    r = client.ai_secrets.replace(name="PY_OPENAI", type="openai", metadata={"nested": {"y": 2}})
    assert r.id == s.id and r.preview_secret == s.preview_secret, "PUT without secret keeps it"
    assert r.metadata == {"nested": {"y": 2}}
    r = client.ai_secrets.replace(name="PY_OPENAI", type="openai", secret="sk-py-secret-000002")
    assert r.preview_secret.endswith("0002")
    u = client.ai_secrets.update(s.id, metadata={"nested": {"z": 3}, "k": "v"})
    assert u.metadata == {"nested": {"z": 3}, "k": "v"}, u.metadata
    u = client.ai_secrets.update(s.id, metadata={"nested": {"w": 4}})
    assert u.metadata == {"nested": {"z": 3, "w": 4}, "k": "v"}, u.metadata
    u = client.ai_secrets.update(s.id, name="PY_OPENAI_RENAMED")
    assert u.name == "PY_OPENAI_RENAMED" and u.metadata["k"] == "v"
    got = client.ai_secrets.retrieve(s.id)
    assert got.name == "PY_OPENAI_RENAMED"
    for i in range(3):
        client.ai_secrets.create(name=f"PY_EXTRA_{i}", type="anthropic", secret=f"value-{i}-abcdef")
    names = [x.name for x in client.ai_secrets.list(limit=1)]
    assert names[:3] == ["PY_EXTRA_2", "PY_EXTRA_1", "PY_EXTRA_0"], names
    assert "PY_OPENAI_RENAMED" in names
    typed = client.ai_secrets.list(ai_secret_type=["openai"]).objects
    assert [x.name for x in typed] == ["PY_OPENAI_RENAMED"], [x.name for x in typed]
    both = client.ai_secrets.list(ai_secret_type=["openai", "anthropic"]).objects
    assert len(both) == 4
    found = client.ai_secrets.list(ai_secret_name="PY_EXTRA_1").objects
    assert len(found) == 1
    gone = client.ai_secrets.find_and_delete(name="PY_EXTRA_1")
    assert gone.name == "PY_EXTRA_1"
    expect_status(404, lambda: client.ai_secrets.retrieve(gone.id))
    d = client.ai_secrets.delete(s.id)
    assert d.id == s.id
    for x in client.ai_secrets.list():
        client.ai_secrets.delete(x.id)
    assert client.ai_secrets.list().objects == []


@check("env_var life cycle")
def _():
    e = client.env_vars.create(object_type="project", object_id="proj-1", name="DB_URL", value="postgres://secret")
    assert e.object_type == "project" and e.object_id == "proj-1" and e.name == "DB_URL" and e.used is None
    again = client.env_vars.create(object_type="project", object_id="proj-1", name="DB_URL", value="other")
    assert again.id == e.id
    other = client.env_vars.create(object_type="organization", object_id="org-1", name="DB_URL", value="x")
    assert other.id != e.id
    listed = client.env_vars.list(object_type="project", object_id="proj-1").objects
    assert [x.id for x in listed] == [e.id]
    assert len(client.env_vars.list().objects) == 2
    assert [x.id for x in client.env_vars.list(env_var_name="DB_URL", object_type="organization").objects] == [other.id]
    assert client.env_vars.retrieve(e.id).name == "DB_URL"
    u = client.env_vars.update(e.id, name="DATABASE_URL", value="postgres://new")
    assert u.id == e.id and u.name == "DATABASE_URL"
    u = client.env_vars.update(e.id, name="DATABASE_URL")
    assert u.name == "DATABASE_URL"
    r = client.env_vars.replace(object_type="project", object_id="proj-1", name="DATABASE_URL", value="v3")
    assert r.id == e.id
    expect_status(400, lambda: client.env_vars.create(object_type="team", object_id="t", name="X"))
    d = client.env_vars.delete(e.id)
    assert d.id == e.id
    expect_status(404, lambda: client.env_vars.retrieve(e.id))
    client.env_vars.delete(other.id)


@check("errors surface as the client's typed exceptions")
def _():
    bad = Braintrust(api_key="sk-" + "x" * 48, base_url=BASE, http_client=httpx.Client(verify=CA), max_retries=0)
    try:
        bad.api_keys.list()
        raise AssertionError("a bad key was accepted")
    except braintrust_api.AuthenticationError:
        pass
    proxy_key = client.api_keys.create(name="py-proxy-role")
    weak = Braintrust(api_key=proxy_key.key, base_url=BASE, http_client=httpx.Client(verify=CA), max_retries=0)
    try:
        weak.api_keys.list()
        raise AssertionError("a proxy-role key used the admin API")
    except braintrust_api.PermissionDeniedError:
        pass
    client.api_keys.delete(proxy_key.id)
    expect_status(404, lambda: client.ai_secrets.retrieve("00000000-0000-4000-8000-000000000000"))


@check("the client's retry-on-429 was exercised and every 429 carried Retry-After")
def _():
    assert statuses.count(429) > 0, "no 429 seen: the admin rate limit was not reached"
    assert not missing_retry_after, f"429 without Retry-After / RateLimit-Policy: {missing_retry_after}"
    print(f"     ({statuses.count(429)} answers were 429 and were retried by the client)")


failed = [n for n, e in results if e is not None]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
