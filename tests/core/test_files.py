"""felix.core.files: the one JSONL reader (lines end at \\n only), the JSON reader's errors, and the cleanup of what
killed writers leave behind."""

import json
import os
import subprocess
import sys

import pytest

from felix.core.files import atomic_write_text, jsonl_lines

# separators str.splitlines() breaks on, all legal inside a JSON string as json.dumps(ensure_ascii=False) writes them
SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]


def test_jsonl_lines_split_on_newline_only(tmp_path):
    records = [{"text": f"before{sep}after", "i": i} for i, sep in enumerate(SEPARATORS)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    assert any("\u2028" in ln for ln in lines)  # written raw: what the old reader split on
    text = "\n".join(lines[:3]) + "\r\n\n" + "\n".join(lines[3:]) + "\n"
    got = list(jsonl_lines(text, "f.jsonl"))
    assert [obj for _, obj, _ in got] == [json.loads(json.dumps(r)) for r in records]
    assert all(problem is None for _, _, problem in got)
    # line numbers count "\n" only: the blank line after the CRLF is line 4
    assert [where for where, _, _ in got] == [f"f.jsonl:{n}" for n in (1, 2, 3, 5, 6, 7, 8, 9)]


def test_jsonl_lines_report_bad_lines_by_number():
    text = '{"a": 1}\n{"b": "x\u2028y"}\nnot json\n' + "[" * 100000 + "\n"
    got = list(jsonl_lines(text, "p"))
    assert [(w, p is None) for w, _, p in got] == [("p:1", True), ("p:2", True), ("p:3", False), ("p:4", False)]


def test_read_json_names_the_file_and_the_problem(tmp_path):
    from felix.core.files import read_json

    cases = {
        "missing.json": None,
        "binary.json": b"\x80\xff\x00garbage",
        "broken.json": b'{"a": ',
        "list.json": b"[1, 2]",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    expect = {
        "missing.json": "does not exist",
        "binary.json": "as UTF-8 text",
        "broken.json": "as JSON",
        "list.json": "holds a JSON list, expected a JSON object",
    }
    for name, fragment in expect.items():
        with pytest.raises(ValueError, match=fragment) as e:
            read_json(tmp_path / name, kind="config")
        assert str(tmp_path / name) in str(e.value)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_writer_removes_temps_of_killed_writers_only(tmp_path):
    from felix.core.files import remove_stale_temps, temp_path

    out = tmp_path / "report.json"
    dead = out.with_name(f".{out.name}.tmp-{_dead_pid()}")
    live = out.with_name(f".{out.name}.tmp-{os.getppid()}")  # our parent: alive while we run
    other = tmp_path / f".other.json.tmp-{_dead_pid()}"  # another destination's leftover: not ours to judge
    for p in (dead, live, other):
        p.write_text("half a file")
    atomic_write_text(out, "{}")
    assert out.read_text() == "{}"
    assert not dead.exists() and live.exists() and other.exists()
    assert not temp_path(out).exists()
    assert remove_stale_temps(tmp_path / "other.json") == [other]
