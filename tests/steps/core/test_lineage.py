"""steps/core/lineage.py: run keys and the code version that make artifact keys content-addressed."""

from __future__ import annotations

from steps.config import ScrubConfig
from steps.core import lineage


def test_run_key_changes_with_every_input_and_not_with_field_order():
    key = lineage.run_key("scrub", ScrubConfig(), ["a"])
    assert key == lineage.run_key("scrub", ScrubConfig(), ["a"]) and len(key) == 32
    assert key != lineage.run_key("scrub", ScrubConfig(), ["b"])
    assert key != lineage.run_key("tokenize", ScrubConfig(), ["a"])
    assert key != lineage.run_key("scrub", ScrubConfig(near_threshold=0.9), ["a"])
    assert lineage.run_key("x", {"a": 1, "b": 2}, []) == lineage.run_key("x", {"b": 2, "a": 1}, [])


def test_canonical_json_is_sorted_and_compact():
    assert lineage.canonical_json({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'


def test_the_code_version_covers_every_module_of_every_subpackage_and_the_reference_data(tmp_path, monkeypatch):
    for path in ("config.py", "train/methods/lora.py", "reference/general.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1")
    monkeypatch.setattr(lineage, "STEPS_DIR", tmp_path)
    versions = []
    for path in ("train/methods/lora.py", "reference/general.txt", "config.py"):
        lineage.code_version.cache_clear()
        before = lineage.code_version()
        (tmp_path / path).write_text("v2")
        lineage.code_version.cache_clear()
        versions.append((before, lineage.code_version()))
    lineage.code_version.cache_clear()
    assert all(before != after for before, after in versions), versions


def test_file_and_bytes_digests_agree(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    assert lineage.sha256_file(path) == lineage.sha256_bytes(b"x" * 3_000_000)
