import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.run.artifacts import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    build_stage,
    fingerprint,
    read_manifest,
    stage_dir,
)


def test_fingerprint_is_canonical_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint("x", {"a": 1}) != fingerprint("x", {"a": 2})
    assert fingerprint("ab", "c") != fingerprint("a", "bc")
    assert len(fingerprint("x")) == 16


def test_fingerprint_of_config_section_ignores_unrelated_sections():
    base = load_config(None)
    changed_train = load_config(None, ["train.lr=0.5"])
    changed_tokenizer = load_config(None, ["tokenizer.vocab_size=1024"])
    assert fingerprint(base.tokenizer) == fingerprint(changed_train.tokenizer)
    assert fingerprint(base.tokenizer) != fingerprint(changed_tokenizer.tokenizer)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": [1, 2]})
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "sub"]


def _write_files(directory):
    (directory / "out.txt").write_text("result")
    return {"answer": 42}


def test_build_then_reuse(tmp_path, capsys):
    first = build_stage(tmp_path, "demo", "f00", code_version="demo-1", inputs={"up": "abc"}, build_fn=_write_files)
    assert not first.reused and first.path == stage_dir(tmp_path, "demo", "f00")
    manifest = read_manifest(first.path)
    assert manifest["stage"] == "demo" and manifest["fingerprint"] == "f00"
    assert manifest["code_version"] == "demo-1" and manifest["inputs"] == {"up": "abc"}
    assert manifest["outputs"] == ["out.txt"] and manifest["figures"] == {"answer": 42}
    assert manifest["created"]

    second = build_stage(tmp_path, "demo", "f00", code_version="demo-1", inputs={}, build_fn=_fail_if_called)
    assert second.reused and second.manifest == manifest

    (first.path / "out.txt").unlink()  # a damaged entry is rebuilt, saying why
    third = build_stage(tmp_path, "demo", "f00", code_version="demo-1", inputs={}, build_fn=_write_files)
    assert not third.reused and (third.path / "out.txt").is_file()
    assert "cached demo f00 is damaged (1 file(s) missing, e.g. out.txt); rebuilding it" in capsys.readouterr().out


def _fail_if_called(directory):
    raise AssertionError("a cached stage must not be rebuilt")


def test_failed_build_leaves_nothing(tmp_path):
    def broken(directory):
        (directory / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_stage(tmp_path, "demo", "f01", code_version="1", inputs={}, build_fn=broken)
    assert list((tmp_path / "cache" / "demo").iterdir()) == []


def test_directory_without_manifest_is_rebuilt(tmp_path):
    untrusted = stage_dir(tmp_path, "demo", "f02")
    untrusted.mkdir(parents=True)
    (untrusted / "out.txt").write_text("stale")
    result = build_stage(tmp_path, "demo", "f02", code_version="1", inputs={}, build_fn=_write_files)
    assert not result.reused and (result.path / "out.txt").read_text() == "result"


KILLED_BUILD = textwrap.dedent("""
    import os, sys
    from pipeline.run.artifacts import build_stage

    def build(directory):
        (directory / "half.bin").write_bytes(b"x" * 1000)
        os._exit(9)  # killed mid-build: no cleanup code runs

    build_stage(sys.argv[1], "demo", "f03", code_version="1", inputs={}, build_fn=build)
""")


def test_killed_build_is_not_trusted_and_its_temp_dir_is_removed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], env=env)
    assert done.returncode == 9
    stage_root = tmp_path / "cache" / "demo"
    leftovers = list(stage_root.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")  # the killed build's temp dir
    assert read_manifest(stage_dir(tmp_path, "demo", "f03")) is None

    result = build_stage(tmp_path, "demo", "f03", code_version="1", inputs={}, build_fn=_write_files)
    assert not result.reused
    assert [p.name for p in stage_root.iterdir()] == ["f03"]
    assert (result.path / MANIFEST).is_file()
