"""Content-addressed stage artifacts: fingerprints, atomic writes and the stage cache.

A stage's output lives in `<workdir>/cache/<stage>/<fingerprint>/` next to a `manifest.json`
{stage, fingerprint, code_version, inputs, outputs, figures, created}. The fingerprint hashes
everything the output depends on (config section, the stage's CODE_VERSION, input fingerprints),
so equal fingerprints mean interchangeable outputs and a rerun reuses the directory.

A build writes into a temporary sibling directory and renames it into place only once the
manifest is written, so a killed build never leaves a directory that a later run would trust. A
resumable stage builds in `.build-<fingerprint>` instead, under a lock, and keeps that directory when
killed: its build function finds there what it completed before and trusts only that.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import to_plain
from pipeline.errors import UserError

MANIFEST = "manifest.json"
FINGERPRINT_CHARS = 16
_TEMP_PREFIX = ".tmp-"
_BUILD_PREFIX = ".build-"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text on every machine."""
    return json.dumps(to_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """Short hex sha256 over the canonical JSON of the parts (config sections, strings, dicts)."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(to_plain(value), indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class StageResult:
    """A stage's cached output directory, its manifest, and whether this call reused it."""

    path: Path
    manifest: dict
    reused: bool

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def stage_dir(workdir: str | Path, stage: str, fingerprint_: str) -> Path:
    return Path(workdir).resolve() / "cache" / stage / fingerprint_


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a completed stage directory, or None if there is none (not a trusted artifact)."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_stage(
    workdir: str | Path,
    stage: str,
    fingerprint_: str,
    *,
    code_version: str,
    inputs: dict[str, str],
    build_fn: Callable[[Path], dict | None],
    verify: Callable[[Path], None] | None = None,
    resumable: bool = False,
) -> StageResult:
    """Reuse `<workdir>/cache/<stage>/<fingerprint>/` if complete and sound, else build it atomically.

    `build_fn(temp_dir)` writes the stage's files into temp_dir and returns its figures (or None).
    A cached entry is sound when every output its manifest lists exists and `verify(directory)` (if
    given) raises no UserError; an unsound one is deleted and rebuilt, saying why. With `resumable`,
    build_fn gets the same directory again after a killed build (or one failed by anything but a
    UserError, whose fix changes the fingerprint), and concurrent builds of one fingerprint wait for
    each other.
    """
    final = stage_dir(workdir, stage, fingerprint_)
    cached = _sound_entry(stage, final, fingerprint_, verify)
    if cached is not None:
        return cached
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(final.parent)
    if not resumable:
        temp = final.parent / f"{_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        temp.mkdir()
        try:
            return _build(stage, fingerprint_, code_version, inputs, build_fn, temp, final)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    with _locked(final.parent / f"{_BUILD_PREFIX}{fingerprint_}.lock"):
        cached = _sound_entry(stage, final, fingerprint_, verify, quiet=True)  # built while we waited
        if cached is not None:
            return cached
        temp = final.parent / f"{_BUILD_PREFIX}{fingerprint_}"
        temp.mkdir(exist_ok=True)
        try:
            return _build(stage, fingerprint_, code_version, inputs, build_fn, temp, final)
        except UserError:  # bad input: the fix changes the fingerprint, so nothing here is worth resuming
            shutil.rmtree(temp, ignore_errors=True)
            raise


def _sound_entry(
    stage: str, final: Path, fingerprint_: str, verify: Callable[[Path], None] | None, quiet: bool = False
) -> StageResult | None:
    manifest = read_manifest(final)
    if manifest is None or manifest.get("fingerprint") != fingerprint_:
        return None
    problem = _cache_problem(final, manifest, verify)
    if problem is None:
        return StageResult(final, manifest, reused=True)
    if not quiet:
        print(f"cached {stage} {fingerprint_} is damaged ({problem}); rebuilding it", flush=True)
    return None


def _build(
    stage: str,
    fingerprint_: str,
    code_version: str,
    inputs: dict[str, str],
    build_fn: Callable[[Path], dict | None],
    temp: Path,
    final: Path,
) -> StageResult:
    if final.exists():  # a directory without a sound manifest: distrust it
        shutil.rmtree(final)
    figures = build_fn(temp) or {}
    manifest = _manifest(stage, fingerprint_, code_version, inputs, temp, figures)
    atomic_write_json(temp / MANIFEST, manifest)
    return _publish(temp, final, manifest)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (flock: released when the process dies, so never stale). The file is
    removed when the holder is done; a waiter then holds the removed file's lock, finds the entry built,
    or builds it again into the same directory, which is safe: every file there is written atomically."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_problem(directory: Path, manifest: dict, verify: Callable[[Path], None] | None) -> str | None:
    """Why a cached entry cannot be reused, or None."""
    missing = [name for name in manifest.get("outputs", []) if not (directory / name).is_file()]
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if verify is not None:
        try:
            verify(directory)
        except UserError as exc:
            return str(exc)
    return None


def _manifest(
    stage: str, fingerprint_: str, code_version: str, inputs: dict[str, str], directory: Path, figures: dict
) -> dict:
    outputs = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return {
        "stage": stage,
        "fingerprint": fingerprint_,
        "code_version": code_version,
        "inputs": dict(inputs),
        "outputs": outputs,
        "figures": figures,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _publish(temp: Path, final: Path, manifest: dict) -> StageResult:
    try:
        os.rename(temp, final)
    except OSError:
        # Another process published the same fingerprint first; its output is interchangeable with ours.
        theirs = read_manifest(final)
        if theirs is None:
            raise
        return StageResult(final, theirs, reused=True)
    return StageResult(final, manifest, reused=False)


def remove_stale_temp_dirs(parent: Path) -> None:
    """Delete temp dirs of builds killed on this host; other hosts' builds may still be running."""
    for temp in parent.glob(f"{_TEMP_PREFIX}*"):
        owner, _, host = temp.name[len(_TEMP_PREFIX) :].partition("@")
        pid = owner.split("-")[0]
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(temp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
