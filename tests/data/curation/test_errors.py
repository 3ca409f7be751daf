"""Bad curation input and an unwritable output: one `llama_jax: error:` line (exit 2) and nothing written, or,
for some malformed records among valid ones, one warning line and the counts in stats.json."""

import errno
import json
import os
import subprocess
import sys

import pytest

from llama_jax.data import curation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
GOOD = json.dumps({"text": "A valid document with enough words to be kept by the masking stage."}).encode()


def _curate(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "llama_jax.curate", "--stages=pii", *args], capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc, [line for line in proc.stderr.splitlines() if line.startswith("llama_jax: ")]


def _error_line(*args, cwd):
    proc, lines = _curate(*args, cwd=cwd)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("llama_jax: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\x1a\x00\x00\xff\xfe binary\x00\n\xff\xd8\xff\xe0\n", r"2 malformed records \(2 not UTF-8\); "
     r"first: .*bad\.jsonl:1: not UTF-8 \('utf-8' codec can't decode byte 0x89"),
    (b"", r"1 empty file; first: .*bad\.jsonl: empty file"),
    (b"\n  \n", r"1 empty file; first: .*bad\.jsonl: empty file"),
    (b'{"id": 1}\n[1, 2]\n{"text": "x"\n', r"3 malformed records \(2 invalid JSON, 1 without text\); "
     r"first: .*bad\.jsonl:1: without text: '\{\"id\": 1\}'"),
], ids=["binary", "empty", "blank_lines", "no_valid_record"])
def test_input_without_a_valid_record_is_an_error_and_writes_nothing(tmp_path, content, expected):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=r"curate: no valid record in input '.*bad\.jsonl': " + expected) as e:
        curation.run(str(tmp_path / "bad.jsonl"), str(tmp_path / "new" / "out"), stages="pii")
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output, no staging, no created parent


def test_cli_reports_an_undecodable_input_in_one_line(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(11, 256)) * 4)  # no newline: one line
    line = _error_line("--input=bin.jsonl", "--output=out", cwd=tmp_path)
    assert "no valid record in input 'bin.jsonl': 1 malformed record (1 not UTF-8); first: " in line, line
    assert "bin.jsonl:1: not UTF-8" in line, line
    assert sorted(os.listdir(tmp_path)) == ["bin.jsonl"]


def test_some_malformed_records_are_skipped_with_one_warning_and_counted(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(GOOD + b"\n{broken\n" + GOOD.replace(b"valid", b"second") + b"\n")
    (tmp_path / "in" / "b.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n')
    stats = curation.run(str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "out"), stages="pii")
    assert stats["output"]["docs"] == 2
    assert stats["bad_input"] == {"malformed_json": 1, "no_text": 0, "undecodable": 1, "empty_file": 0}
    first = f"{tmp_path / 'in' / 'a.jsonl'}:2: invalid JSON: '{{broken'"
    assert stats["bad_input_first"] == first
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["bad_input_first"] == first

    proc, lines = _curate("--input=in/*.jsonl", "--output=out2", cwd=tmp_path)
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr
    assert lines[0] == ("llama_jax: warning: curate: skipped 2 malformed records (1 invalid JSON, 1 not UTF-8) in "
                        "input 'in/*.jsonl' (2 files); first: in/a.jsonl:2: invalid JSON: '{broken'"), lines[0]
    assert "curate: 2 documents in, 2 out" in proc.stdout, proc.stdout


def test_output_under_a_file_is_one_error_line(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    (tmp_path / "afile").write_text("x")
    line = _error_line("--input=in.jsonl", "--output=afile/out", cwd=tmp_path)
    assert "output" in line and "afile/out" in line and "is a file, not a directory" in line, line
    assert sorted(os.listdir(tmp_path)) == ["afile", "in.jsonl"]


def test_output_in_a_read_only_directory_is_one_error_line(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as root: chmod does not make a directory read-only")
        line = _error_line("--input=in.jsonl", "--output=ro/out", cwd=tmp_path)
        assert "output" in line and "ro/out" in line and "not writable" in line, line
        assert os.listdir(tmp_path / "ro") == []
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_output_on_a_read_only_filesystem_names_the_output(tmp_path, monkeypatch):
    (tmp_path / "in.jsonl").write_bytes(GOOD + b"\n")
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):  # a read-only mount: creating anything under tmp_path fails
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(PermissionError, match=r"curate: cannot write output '.*out': Read-only file system"):
        curation.run(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), stages="pii")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_a_glob_without_a_folder_matches_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_bytes(GOOD + b"\n")
    monkeypatch.chdir(tmp_path)
    stats = curation.run("*.jsonl", "out", stages="pii")
    assert stats["input"]["files"] == 1 and stats["output"]["docs"] == 1
