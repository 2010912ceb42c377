"""steps/core/store.py: tamper evidence. A manifest is verified on every read (its digest recomputed over
its file list and inputs, and equal to the reference's), and a cache hit is re-checked file by file."""

import json
import logging

import pytest

from steps.core.errors import ArtifactError
from steps.core.lineage import run_key, sha256_bytes
from steps.core.store import MANIFEST


def committed(store, name: str, files: dict[str, bytes], inputs=()):
    writer = store.writer("demo", run_key("demo", {"name": name}, [i.digest for i in inputs]), {}, inputs=inputs)
    for path, data in files.items():
        writer.put_bytes(path, data)
    return writer.commit()


def test_a_file_rewritten_with_its_manifest_entry_is_refused_naming_the_key(store):
    """The attack: replace a weight file and its sha256 in the manifest together, through the S3 client."""
    upstream = committed(store, "up", {"x.txt": b"x"})
    ref = committed(store, "w", {"w.bin": b"\x00" * 64, "config.json": b"{}"}, inputs=[upstream])
    evil = b"\xff" * 64
    manifest = json.loads(store.get_bytes(f"{ref.key}/{MANIFEST}"))
    manifest["files"]["w.bin"] = {"sha256": sha256_bytes(evil), "size": len(evil)}
    store.client.put_object(Bucket=store.bucket, Key=f"{ref.key}/w.bin", Body=evil)
    store.client.put_object(Bucket=store.bucket, Key=f"{ref.key}/{MANIFEST}", Body=json.dumps(manifest).encode())
    for read in (lambda: store.manifest(ref.key), lambda: store.read_bytes(ref, "w.bin"),
                 lambda: store.download(ref), lambda: store.lookup("demo", ref.key.rsplit("/", 1)[1]),
                 lambda: list(store.iter_lines(ref, "config.json"))):
        with pytest.raises(ArtifactError, match=f"{ref.key}: the manifest's digest does not match"):
            read()

    # Recomputing the digest too makes a manifest that verifies, but not the one the reference names.
    manifest["digest"] = sha256_bytes(json.dumps(
        {"files": manifest["files"], "inputs": [upstream.digest]}, sort_keys=True, separators=(",", ":")).encode())
    store.client.put_object(Bucket=store.bucket, Key=f"{ref.key}/{MANIFEST}", Body=json.dumps(manifest).encode())
    assert store.manifest(ref.key)["digest"] == manifest["digest"]
    with pytest.raises(ArtifactError, match=f"{ref.key}: the reference's digest {ref.digest[:16]}"):
        store.read_bytes(ref, "w.bin")
    with pytest.raises(ArtifactError, match=f"{ref.key}: the reference's digest"):
        store.download(ref)


def test_an_unreadable_manifest_is_an_artifact_error_naming_the_key(store):
    ref = committed(store, "garbled", {"a.txt": b"a"})
    store.client.put_object(Bucket=store.bucket, Key=f"{ref.key}/{MANIFEST}", Body=b"{not json")
    with pytest.raises(ArtifactError, match=f"{ref.key}: the manifest cannot be read"):
        store.read_bytes(ref, "a.txt")


def test_a_cache_hit_is_rechecked_and_a_tampered_cached_file_downloaded_again(store, tmp_path, caplog):
    store.cache_dir = tmp_path
    ref = committed(store, "cache", {"sub/w.bin": b"\x00\x01" * 100, "c.json": b"{}"})
    folder = store.download(ref)
    (folder / "sub" / "w.bin").write_bytes(b"\x00\x02" * 100)  # same size, other bytes: the hash catches it
    with caplog.at_level(logging.WARNING, logger="steps.core.store"):
        again = store.download(ref)
    assert again == folder and (folder / "sub" / "w.bin").read_bytes() == b"\x00\x01" * 100
    assert "sub/w.bin does not match its manifest digest" in caplog.text and ref.key in caplog.text

    caplog.clear()
    (folder / "c.json").unlink()
    with caplog.at_level(logging.WARNING, logger="steps.core.store"):
        assert (store.download(ref) / "c.json").read_bytes() == b"{}"
    assert "c.json is missing" in caplog.text

    # The cached manifest rewritten along with a file: its digest no longer names the folder.
    caplog.clear()
    cached = json.loads((folder / MANIFEST).read_text())
    cached["files"]["c.json"] = {"sha256": sha256_bytes(b"[1]"), "size": 3}
    (folder / MANIFEST).write_text(json.dumps(cached))
    (folder / "c.json").write_bytes(b"[1]")
    with caplog.at_level(logging.WARNING, logger="steps.core.store"):
        assert (store.download(ref) / "c.json").read_bytes() == b"{}"
    assert "the cached manifest is not the artifact's" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="steps.core.store"):
        store.download(ref)  # intact: reused without a warning
    assert not caplog.text
