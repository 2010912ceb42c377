"""`tuneline scrub`: the PII scrubber on a JSONL file, streaming, order and other fields kept."""

import json
import re
import subprocess
import sys

import pytest

from flows.cli import main
from helpers import write_jsonl


def test_scrubs_named_fields_and_keeps_everything_else(tmp_path, capsys):
    rows = [{"id": 3, "text": "Mail kim.minji@example.co.kr or call 010-2345-6789", "meta": {"k": [1, 2]}},
            {"id": 1, "text": "nothing personal here", "score": 0.5},
            {"id": 2, "text": "card 4111 1111 1111 1111", "messages": [
                {"role": "user", "content": "my ip is 192.168.10.7"}, {"role": "assistant", "content": "ok"}]}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out" / "clean.jsonl"
    assert main(["scrub", "--input", str(source), "--output", str(target), "--field", "text",
                 "--field", "messages"]) == 2  # record 1 has no messages field: nothing written
    assert "in.jsonl:1: rule 'field 'messages' is present'" in capsys.readouterr().err
    assert not target.exists() and not list(target.parent.glob(".*"))
    assert main(["scrub", "--input", str(source), "--output", str(target), "--field", "text"]) == 0
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in out] == [3, 1, 2]
    assert out[0]["text"] == "Mail <EMAIL> or call <PHONE>" and out[0]["meta"] == {"k": [1, 2]}
    assert out[1] == rows[1] and out[2]["text"] == "card <CREDIT_CARD>"
    assert out[2]["messages"] == rows[2]["messages"]  # not a named field
    assert "EMAIL=1" in capsys.readouterr().out


def test_bad_lines_name_file_line_and_rule(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"text": "ok"}\n\n{"text": 5}\n')
    assert main(["scrub", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--field", "text"]) == 2
    assert "bad.jsonl:3: rule 'field 'text' is a string" in capsys.readouterr().err
    source.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert main(["scrub", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--field", "text"]) == 2
    assert "bad.jsonl:2: rule 'line is valid UTF-8'" in capsys.readouterr().err
    source.write_text('{"text": "ok"}\nnot json\n')
    assert main(["scrub", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--field", "text"]) == 2
    assert "bad.jsonl:2: rule 'line is valid JSON'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_memory_stays_flat_on_a_large_file(tmp_path):
    """A file of 200k records (~25 MB) is scrubbed in a fresh process with a small peak RSS."""
    source = tmp_path / "big.jsonl"
    with source.open("w") as f:
        for i in range(200_000):
            f.write(json.dumps({"id": i, "text": f"user{i}@example.com said hello number {i} " * 2}) + "\n")
    # VmHWM is this process's own peak (ru_maxrss would include the forked pytest parent's pages)
    code = ("import sys; from flows.cli import main; "
            f"rc = main(['scrub', '--input', {str(source)!r}, '--output', {str(tmp_path / 'o.jsonl')!r}, "
            "'--field', 'text']); "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 200, peak_mib  # the file alone is ~25 MB; holding it parsed would cost far more
    assert sum(1 for _ in (tmp_path / "o.jsonl").open()) == 200_000


def test_hash_and_mask_actions_keep_order_and_other_fields(tmp_path, capsys, monkeypatch):
    rows = [{"id": 2, "text": "Mail kim.minji@example.co.kr or call 010-2345-6789", "n": 1},
            {"id": 1, "text": "again KIM.MINJI@example.co.kr, +82 10 2345 6789, and lee@example.com"},
            {"id": 0, "text": "nothing personal here"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"

    def scrub(action: str) -> list[dict]:
        assert main(["scrub", "--input", str(source), "--output", str(target), "--field", "text",
                     "--action", action]) == 0
        return [json.loads(line) for line in target.read_text().splitlines()]

    monkeypatch.setenv("TUNELINE_PII_SALT", "a-secret-salt-of-24-chars")
    hashed = scrub("hash")
    assert [r["id"] for r in hashed] == [2, 1, 0] and hashed[0]["n"] == 1 and hashed[2] == rows[2]
    first, second = re.findall(r"<(EMAIL|PHONE):([0-9a-f]{12})>", hashed[0]["text"]), \
        re.findall(r"<(EMAIL|PHONE):([0-9a-f]{12})>", hashed[1]["text"])
    assert [e for e, _ in first] == ["EMAIL", "PHONE"] and [e for e, _ in second] == ["EMAIL", "PHONE", "EMAIL"]
    assert second[:2] == first  # the same email and phone in other layouts: the same tokens
    assert second[2][1] != first[0][1]
    out = capsys.readouterr().out
    assert "PII hashed: EMAIL=3, PHONE=2" in out and "salt id " in out and "a-secret-salt" not in target.read_text()
    monkeypatch.setenv("TUNELINE_PII_SALT", "another-secret-salt-of-24")
    assert scrub("hash")[0]["text"] != hashed[0]["text"]  # another salt, other tokens

    masked = scrub("mask")
    assert masked[0]["text"] == "Mail ***.*****@*******.**.** or call ***-****-6789"
    assert "PII masked" in capsys.readouterr().out
    assert scrub("placeholder")[0]["text"] == "Mail <EMAIL> or call <PHONE>"


def test_hash_without_a_salt_is_a_clear_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "mail me at a@example.com"}])
    target = tmp_path / "out.jsonl"
    monkeypatch.delenv("TUNELINE_PII_SALT", raising=False)
    assert main(["scrub", "--input", str(source), "--output", str(target), "--field", "text",
                 "--action", "hash"]) == 2
    assert "needs a secret salt in the environment variable TUNELINE_PII_SALT" in capsys.readouterr().err
    monkeypatch.setenv("TUNELINE_PII_SALT", "short")
    assert main(["scrub", "--input", str(source), "--output", str(target), "--field", "text",
                 "--action", "hash"]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
    assert not target.exists() and not list(tmp_path.glob(".out.jsonl.*"))
    with pytest.raises(SystemExit):
        main(["scrub", "--input", str(source), "--output", str(target), "--field", "text", "--action", "redact"])
    assert "invalid choice: 'redact'" in capsys.readouterr().err
