"""pipelines/utils/files.py: the one atomic write every command's outputs use
(docs/reliability.md, Second campaign)."""

import os
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from pipelines.utils import files

from conftest import REPO


def _names(directory):
    return sorted(os.listdir(directory))


def test_a_failure_mid_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("previous\n")
    with pytest.raises(RuntimeError), files.atomic_output(str(path)) as f:
        f.write("half of the new")
        raise RuntimeError("stopped")
    assert path.read_text() == "previous\n" and _names(tmp_path) == ["preds.jsonl"]
    files.write_atomically(str(path), b"new\n")
    assert path.read_bytes() == b"new\n" and _names(tmp_path) == ["preds.jsonl"]


def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path):
    """SIGKILL cannot clean up: only a hidden temporary is left beside the
    previous file, and `temporary_owner` tells whose it is."""
    path = tmp_path / "scores.txt"
    path.write_text("previous\n")
    code = ("import os, signal, sys\nfrom pipelines.utils import files\n"
            "with files.atomic_output(sys.argv[1]) as f:\n"
            "    f.write('x' * 100000); f.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_text() == "previous\n"
    (temporary,) = [n for n in _names(tmp_path) if n != "scores.txt"]
    assert temporary.startswith(".") and files.temporary_owner(temporary) == "scores.txt"


def test_temporaries_are_unique_and_name_their_owner(tmp_path):
    first, second = (files.temporary_path(str(tmp_path / "a.json")) for _ in range(2))
    assert first != second
    assert files.temporary_owner(os.path.basename(first)) == "a.json"
    assert files.temporary_owner(".a.json.tmp-123") == "a.json"  # release 0.1's name
    assert files.temporary_owner("a.json") is None
    assert files.temporary_owner(".a.json.tmp-x") is None


def test_url_outputs_go_through_gfile():
    files.write_atomically("ram://atomic/out.txt", "one")
    files.write_atomically("ram://atomic/out.txt", "two")
    assert tf.io.gfile.GFile("ram://atomic/out.txt").read() == "two"
    assert tf.io.gfile.listdir("ram://atomic") == ["out.txt"]


def test_file_urls_are_local_paths_and_other_urls_are_refused_where_local_is_needed(
        tmp_path):
    assert files.local_path(f"file://{tmp_path}") == str(tmp_path)
    assert files.local_path("ram://x") is None and files.is_url("gs://b/x")
    assert files.require_local(f"file://{tmp_path}", "--output_dir", "why") == str(tmp_path)
    with pytest.raises(ValueError, match="--output_dir='gs://b/x'"):
        files.require_local("gs://b/x", "--output_dir", "it renames files atomically")
    assert not os.path.exists("gs:")
