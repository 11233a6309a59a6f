"""The factory's one build-once helper: lock, reuse, build aside, manifest, atomic publish."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from airan.factory.buildonce import build_once, file_lock
from airan.store.registry import MANIFEST, MANIFEST_VERSION, read_manifest


def _leftovers(root: Path) -> list[str]:
    """Anything beside the published directories: temporaries, old copies, lock files."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


class Builder:
    """Writes one small weight file (its values from `value`) and counts its calls."""

    def __init__(self, value: float = 1.0, delay_s: float = 0.0, fail: BaseException | None = None) -> None:
        self.value, self.delay_s, self.fail = value, delay_s, fail
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, work: Path) -> dict:
        with self.lock:
            self.calls += 1
        save_file({"w": np.full((4, 4), self.value, dtype=np.float32)}, str(work / "model.safetensors"))
        (work / "config.json").write_text("{}")
        time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return {"value": self.value, "weight_bytes": 64}


def test_a_build_is_published_with_its_manifest_and_reused(tmp_path):
    final = tmp_path / "models" / "m"
    build = Builder()
    assert build_once(final, {"seed": 0, "layers": (1, 2)}, build) == final
    manifest = read_manifest(final)
    assert manifest["manifest_version"] == MANIFEST_VERSION and manifest["name"] == "m" and manifest["value"] == 1.0
    assert manifest["request"] == {"seed": 0, "layers": [1, 2]}  # as JSON holds it
    weights = (final / "model.safetensors").read_bytes()
    assert manifest["files_sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    mtime = (final / MANIFEST).stat().st_mtime_ns

    assert build_once(final, {"layers": [1, 2], "seed": 0}, build) == final  # the same request
    assert build.calls == 1 and (final / MANIFEST).stat().st_mtime_ns == mtime
    assert _leftovers(final.parent) == []
    assert (final.stat().st_mode & 0o777, (final / "model.safetensors").stat().st_mode & 0o777) == (0o755, 0o644)

    build_once(final, {"seed": 0, "layers": [1, 2]}, build, force=True)
    assert build.calls == 2


def test_a_different_request_rebuilds_in_place(tmp_path):
    final = tmp_path / "m"
    build_once(final, {"seed": 0}, Builder(1.0))
    other = Builder(2.0)
    assert build_once(final, {"seed": 1}, other) == final
    assert other.calls == 1
    assert read_manifest(final)["request"] == {"seed": 1} and read_manifest(final)["value"] == 2.0
    assert _leftovers(tmp_path) == []


def test_truncated_weights_are_not_a_build(tmp_path):
    final = tmp_path / "m"
    build_once(final, {"seed": 0}, Builder())
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert read_manifest(final) is None
    again = Builder()
    build_once(final, {"seed": 0}, again)
    assert again.calls == 1 and read_manifest(final) is not None


def test_concurrent_callers_build_once(tmp_path):
    final = tmp_path / "m"
    build = Builder(delay_s=0.3)
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: build_once(final, {"seed": 0}, build), range(4)))
    assert paths == {final} and build.calls == 1
    assert _leftovers(tmp_path) == []


def _build_in_a_process(final: str, log: str) -> str:
    def build(work: Path) -> dict:
        with open(log, "a") as f:  # one line per build, whichever process ran it
            f.write("built\n")
        return Builder(delay_s=0.3)(work)

    return str(build_once(Path(final), {"seed": 0}, build))


def test_concurrent_processes_build_once(tmp_path):
    """Several Ray actors (processes) starting at once on a cold cache."""
    final, log = tmp_path / "m", tmp_path / "log"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        paths = pool.starmap(_build_in_a_process, [(str(final), str(log))] * 3)
    assert set(paths) == {str(final)}
    assert log.read_text().splitlines() == ["built"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_an_interrupted_build_publishes_nothing(tmp_path, failure):
    final = tmp_path / "m"
    with pytest.raises(type(failure)):
        build_once(final, {"seed": 0}, Builder(fail=failure))
    assert not final.exists() and read_manifest(final) is None
    assert _leftovers(tmp_path) == []
    # an earlier build stays served when its replacement fails
    build_once(final, {"seed": 0}, Builder(1.0))
    with pytest.raises(type(failure)):
        build_once(final, {"seed": 1}, Builder(2.0, fail=failure))
    assert read_manifest(final)["request"] == {"seed": 0} and read_manifest(final)["value"] == 1.0
    assert _leftovers(tmp_path) == []


def test_a_killed_builds_leftovers_are_removed_by_the_next_build(tmp_path):
    final = tmp_path / "m"
    for stale in (tmp_path / ".tmp-m+abc123", tmp_path / ".old-m+def456"):
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".tmp-m-2+xyz"  # another model's build in progress: not ours to remove
    other.mkdir()
    build_once(final, {"seed": 0}, Builder())
    assert _leftovers(tmp_path) == [other.name]


def test_file_lock_excludes_threads_and_leaves_no_file(tmp_path):
    lock, counter = tmp_path / ".x.lock", tmp_path / "counter"
    counter.write_text("0")

    def bump(_):
        with file_lock(lock):
            value = int(counter.read_text())
            time.sleep(0.01)  # a read-modify-write that races without the lock
            counter.write_text(str(value + 1))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(bump, range(24)))
    assert counter.read_text() == "24" and not lock.exists()


def test_the_manifest_is_json_the_store_reads(tmp_path):
    final = tmp_path / "m"
    build_once(final, {"seed": 0}, Builder())
    assert json.loads((final / MANIFEST).read_text()) == read_manifest(final)
