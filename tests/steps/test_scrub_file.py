"""`tuneline scrub`: the PII scrubber on a JSONL file, streaming, order and other fields kept."""

import json
import subprocess
import sys

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
