import json

import pytest
from botocore.exceptions import ClientError

from helpers import all_keys
from steps.core.errors import ArtifactError, TransientError
from steps.core.lineage import run_key
from steps.core.store import MANIFEST, ArtifactStore


def test_commit_writes_payload_then_manifest_and_lookup_finds_it(store):
    key = run_key("demo", {"a": 1}, [])
    assert store.lookup("demo", key) is None
    writer = store.writer("demo", key, {"a": 1})
    writer.put_jsonl("rows.jsonl", [{"x": 1}, {"x": 2}])
    # Payload without manifest: the artifact does not exist yet.
    assert store.lookup("demo", key) is None
    ref = writer.commit(stats={"rows": 2})
    assert all_keys(store) == [f"{store.prefix}/demo/{key}/{MANIFEST}", f"{store.prefix}/demo/{key}/rows.jsonl"]
    found = store.lookup("demo", key)
    assert found == ref and found.stats == {"rows": 2}
    manifest = store.manifest(ref.key)
    assert manifest["files"]["rows.jsonl"]["size"] == len(b'{"x": 1}\n{"x": 2}\n')
    assert manifest["config"] == {"a": 1} and manifest["run_key"] == key and manifest["code_version"]
    assert store.read_jsonl(ref, "rows.jsonl") == [{"x": 1}, {"x": 2}]


def test_manifest_is_create_only_second_commit_returns_the_first(store):
    key = run_key("demo", {}, [])
    first = store.writer("demo", key, {})
    first.put_bytes("a.txt", b"first")
    ref1 = first.commit(stats={"n": 1})
    second = store.writer("demo", key, {})
    second.put_bytes("b.txt", b"second")
    ref2 = second.commit(stats={"n": 2})
    assert ref2 == ref1
    assert json.loads(store.get_bytes(f"{ref1.key}/{MANIFEST}"))["stats"] == {"n": 1}


def test_tampered_payload_is_refused(store):
    key = run_key("demo", {"t": 1}, [])
    writer = store.writer("demo", key, {})
    writer.put_bytes("a.txt", b"original")
    ref = writer.commit()
    store.put_bytes(f"{ref.key}/a.txt", b"tampered")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        store.read_bytes(ref, "a.txt")
    with pytest.raises(ArtifactError, match="has no file 'missing.txt'"):
        store.read_bytes(ref, "missing.txt")


def test_download_verifies_and_caches_by_digest(store, tmp_path):
    store.cache_dir = tmp_path
    writer = store.writer("demo", run_key("demo", {"d": 1}, []), {})
    writer.put_bytes("sub/w.bin", b"\x00\x01")
    ref = writer.commit()
    folder = store.download(ref)
    assert (folder / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert store.download(ref) == folder == tmp_path / ref.digest


def test_wrong_credentials_are_refused(services, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bad = ArtifactStore.from_env("test-badcreds")
    with pytest.raises(ClientError) as err:
        bad.put_bytes("test-badcreds/x", b"x")
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}


class FlakyClient:
    """Fault injection: the first call answers 503 like an overloaded S3 front end."""

    def put_object(self, **kwargs):
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "reduce rate"},
                           "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")


def test_server_errors_are_typed_transient_for_the_retry_policy():
    store = ArtifactStore(FlakyClient(), "bucket", "prefix")
    with pytest.raises(TransientError, match="transiently"):
        store.put_bytes("prefix/x", b"x")


def test_missing_bucket_setting_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TUNELINE_BUCKET", raising=False)
    with pytest.raises(ArtifactError, match="TUNELINE_BUCKET is not set"):
        ArtifactStore.from_env("x")


# ---- the lock (steps/register/step.py promotion_lock): server times, conditional deletes


def _lock_body(store, key) -> dict:
    return json.loads(store.get_bytes(key))


def test_a_lock_claiming_a_future_time_is_broken_by_server_time(store):
    """The holder-written "at" is never trusted: a lock object whose body claims a time a day ahead
    goes stale by its LastModified on the server, and is broken once older than stale_after."""
    import time

    key = f"{store.prefix}/promote/m.lock"
    forged = {"host": "elsewhere", "pid": 1, "at": time.time() + 86400, "token": "someone-else"}
    store.put_bytes(key, json.dumps(forged).encode())
    started = time.monotonic()
    with store.lock("promote/m", timeout=30, stale_after=2):
        waited = time.monotonic() - started
        assert _lock_body(store, key)["token"] != "someone-else"
    assert 1.5 < waited < 10, waited  # held for about stale_after (LastModified has 1 s resolution), then broken
    assert not store.exists(key)


def test_a_fresh_lock_blocks_until_the_timeout(store):
    key = f"{store.prefix}/promote/m.lock"
    with store.lock("promote/m", timeout=5):
        with pytest.raises(TransientError, match="still held after 1 s"):
            with store.lock("promote/m", timeout=1, stale_after=60):
                pass
        assert store.exists(key)
    assert not store.exists(key)


def test_release_never_deletes_a_lock_another_holder_took_after_ours_went_stale(store):
    import time

    key = f"{store.prefix}/promote/m.lock"
    ours = store.lock("promote/m", stale_after=1)
    ours.__enter__()
    mine = _lock_body(store, key)["token"]
    time.sleep(2.5)  # we hang past the stale window; the next holder breaks our lock and takes it
    with store.lock("promote/m", timeout=10, stale_after=1):
        theirs = _lock_body(store, key)["token"]
        assert theirs != mine
        ours.__exit__(None, None, None)  # our late release: a conditional delete on OUR ETag, refused (412)
        assert store.exists(key) and _lock_body(store, key)["token"] == theirs
    assert not store.exists(key)


def test_breaking_a_stale_lock_never_deletes_the_one_that_replaced_it(store, monkeypatch):
    """Between judging a lock stale and deleting it, another holder breaks it and takes the lock
    (fault injection: a write slipped in after our read). The break is conditional on the ETag
    judged stale, so the new holder's lock stays and we wait for it."""
    import time

    key = f"{store.prefix}/promote/m.lock"
    store.put_bytes(key, json.dumps({"token": "dead-holder"}).encode())
    time.sleep(3.2)
    original, slipped = store._lock_held, []

    def read_then_someone_retakes(k):
        held = original(k)
        if held is not None and held["token"] == "dead-holder" and not slipped:
            store.put_bytes(key, json.dumps({"token": "new-holder"}).encode())
            slipped.append(1)
        return held

    monkeypatch.setattr(store, "_lock_held", read_then_someone_retakes)
    with pytest.raises(TransientError, match="still held"):
        with store.lock("promote/m", timeout=1, stale_after=2):
            pass
    assert slipped and _lock_body(store, key)["token"] == "new-holder"
