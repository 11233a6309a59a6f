"""Build a model directory once: lock, reuse, build aside, record, publish.

Every product of the factory (the tiny test model, the converted SmolLM2,
each variant, the LoRA adapter) goes through `build_once`:

1. a file lock per directory, so concurrent callers (several Ray actors, two
   shells) build it once: the others wait, then reuse the result;
2. reuse when the published directory's manifest records the same request
   (the JSON that says what was asked for: parent hash, parameters, seed...);
3. the build writes into a fresh temporary sibling directory;
4. the manifest (request, sha256 of each weight file, the builder's facts)
   goes into that directory last;
5. one rename publishes it, so a reader sees the old build, nothing, or the
   whole new one, never half of it; a failed or interrupted build publishes
   nothing and leaves no temporary directory behind.

The store (`airan.store.registry.read_manifest`) reads what this writes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

from rich.console import Console

from airan.store.registry import MANIFEST, MANIFEST_VERSION, read_manifest

_CHUNK = 4 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(files: list[Path]) -> str:
    """One digest over files (their names and contents, in name order): a parent's weights."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(directory: Path) -> str:
    return sha256_files(list(Path(directory).glob("*.safetensors")))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (flock) on `path`, removed when released.

    Removing a lock file is safe only if a waiter that wakes on the removed inode notices and
    locks the new file instead: it compares the inode it holds with the one at `path`.
    flock is per open file, so threads of one process exclude each other too.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            break
        os.close(fd)  # the holder before us removed this file: lock the new one
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def normalized(request: Mapping) -> dict:
    """The request as the manifest will hold it (JSON types: tuples become lists)."""
    return json.loads(json.dumps(request, sort_keys=True))


def reusable(final: Path, request: Mapping) -> dict | None:
    """The manifest of the published build in `final` if it records `request`, else None."""
    manifest = read_manifest(final)
    return manifest if manifest is not None and manifest.get("request") == normalized(request) else None


Builder = Callable[[Path], Mapping | None]


def build_once(final: Path, request: Mapping, build: Builder, *, force: bool = False) -> Path:
    """Publish at `final` what `build(work_dir)` writes into an empty temporary directory, unless
    a build recording the same `request` is already there (and not `force`); return `final`.

    `build` returns the facts to record in the manifest (or None); the helper adds
    manifest_version, name, request and files_sha256 (sha256 of each *.safetensors file).
    """
    final = Path(final)
    request = normalized(request)
    if not force and reusable(final, request) is not None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if not force and reusable(final, request) is not None:  # another caller built it meanwhile
            return final
        _remove_leftovers(final)  # of a build killed before its cleanup ran (we hold the lock)
        work = Path(tempfile.mkdtemp(prefix=_temp_prefix(".tmp-", final), dir=final.parent))
        try:
            facts = dict(build(work) or {})
            manifest = {
                **facts,
                "manifest_version": MANIFEST_VERSION,
                "name": facts.get("name", final.name),
                "request": request,
                "files_sha256": {f.name: sha256_file(f) for f in sorted(work.glob("*.safetensors"))},
            }
            (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            publish(work, final)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return final


def publish(work: Path, final: Path) -> None:
    """Move a finished build into place, replacing an older one; readable by Ray workers, which
    may run as another user (mkdtemp and safetensors create owner-only modes)."""
    for root, dirs, files in os.walk(work):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(".old-", final), dir=final.parent))
        os.rename(final, old / "v")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(work, final)


def _temp_prefix(kind: str, final: Path) -> str:
    # "+" never occurs in a model name: no other directory's temporaries match this prefix
    return f"{kind}{final.name}+"


def _remove_leftovers(final: Path) -> None:
    for kind in (".tmp-", ".old-"):
        for stale in final.parent.glob(_temp_prefix(kind, final) + "*"):
            shutil.rmtree(stale, ignore_errors=True)


class Steps:
    """Numbered step lines on stderr (stdout stays free for the CLI's result), with each
    step's seconds kept for the manifest: `with steps("converting"): ...`."""

    def __init__(self, name: str, total: int, enabled: bool = True) -> None:
        self.name, self.total, self.enabled, self.done = name, total, enabled, 0
        self.seconds: dict[str, float] = {}
        self._console = Console(stderr=True, highlight=False)

    def say(self, text: str, style: str | None = None) -> None:
        if self.enabled:
            self._console.print(text, style=style)

    @contextmanager
    def __call__(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        self.say(f"[bold]{self.name} [{self.done}/{self.total}][/bold] {text} ...")
        yield
        elapsed = time.perf_counter() - start
        self.seconds[text] = round(elapsed, 2)
        self.say(f"      done in {elapsed:.1f} s", style="dim")
