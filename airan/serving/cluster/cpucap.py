"""Caps a replica's real CPU use to its site's forecast AI headroom, and measures that use.

The cap holds the replica actor's process and everything it starts (vLLM's engine core and
workers). Which mechanism depends on the host; `detect()` tries them in order:

1. cgroup v2 `cpu.max` (a child of this process's cgroup, with the cpu controller delegated),
2. cgroup v1 CFS bandwidth (`cpu.cfs_quota_us` / `cpu.cfs_period_us`), the same throttle in the
   older hierarchy (what Firecracker-style VMs with a v1 cpu mount offer),
3. CPU affinity plus niceness: the process tree is held to ceil(cap) cores and reniced as the cap
   falls below one core. It bounds use only to whole cores: a cap of 0.3 still lets the tree run a
   whole core when nothing else wants it, so measured use can exceed the cap (the report says so).

A cgroup holds the process tree from the moment the actor joins it, so the actor joins before its
engine starts and every process the engine forks inherits the cap. Groups live under
`airan/<scope>/<replica>-<pid>`, the scope naming the stack (the actor's Ray node): two stacks on
one host (two control planes, a test beside a benchmark) share the cgroup hierarchy, and neither
may take the other's groups for its own or clean them away. Use is measured by process CPU
accounting (psutil: user + system seconds of the live process tree).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)
# the CFS period a cap is enforced over: a capped replica that used its quota waits up to the rest of
# the period, so a shorter one hands the radio its share at a finer grain and makes a throttled answer's
# latency closer to CPU time / cap (the admission predicts that); 50 ms keeps the kernel's 1 ms quota
# floor at the 0.02 CPU a draining replica keeps
PERIOD_US = 50_000
MIN_QUOTA_US = 1_000  # the kernel's floor for a CFS quota
GROUP_PARENT = "airan"
# a group left empty this long belongs to no live replica of any stack (a live one joins its group
# within a second of making it); another stack's groups are cleaned only then
STALE_GROUP_S = 600.0


@dataclass(frozen=True)
class CapState:
    mechanism: str  # "cgroup2", "cgroup1", "affinity"
    cpus: float | None  # the cap in force (None: uncapped)
    where: str  # the cgroup directory, or the cores the tree is pinned to


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in process_tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) from /proc/self/mountinfo."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 3:
            out.append((fields[4], rfields[0], rfields[2]))
    return out


def _own_cgroup_v2_path() -> str | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    except OSError:
        pass
    return None


class CpuCap:
    """One replica's cap. `join(pid)` before the engine starts, `set(cpus)` as headroom moves."""

    def __init__(self, name: str, cpu_ids: list[int] | None = None, scope: str = "") -> None:
        self.name = _safe(name)
        self.scope = _safe(scope)  # the stack the replica belongs to ("": none named)
        self.cpu_ids = sorted(cpu_ids) if cpu_ids else sorted(os.sched_getaffinity(0))
        self.mechanism = "affinity"
        self.dir: Path | None = None
        self.pid: int | None = None
        self.cpus: float | None = None
        self._return_to: Path | None = None

    # -- setup -------------------------------------------------------------------------------
    def join(self, pid: int) -> CapState:
        """Put `pid` (and what it starts later) under the cap: the first mechanism that works here."""
        self.pid = pid
        for try_join in (self._join_cgroup2, self._join_cgroup1):
            try:
                if try_join(pid):
                    break
            except OSError as e:
                log.debug("cpu cap %s: %s", try_join.__name__, e)
        else:
            self.mechanism = "affinity"
        return self.state()

    def _join_cgroup2(self, pid: int) -> bool:
        own = _own_cgroup_v2_path()
        for mount, fstype, _ in _mounts():
            if fstype != "cgroup2" or own is None:
                continue
            base = Path(mount) / own.lstrip("/")
            if "cpu" not in (base / "cgroup.controllers").read_text().split():
                continue
            parent = base / GROUP_PARENT
            parent.mkdir(exist_ok=True)
            (base / "cgroup.subtree_control").write_text("+cpu")
            (parent / "cgroup.subtree_control").write_text("+cpu")
            if self.scope:
                parent = parent / self.scope
                parent.mkdir(exist_ok=True)
                (parent / "cgroup.subtree_control").write_text("+cpu")
            group = parent / f"{self.name}-{pid}"
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text(f"max {PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
            self.mechanism, self.dir, self._return_to = "cgroup2", group, base
            return True
        return False

    def _join_cgroup1(self, pid: int) -> bool:
        for mount, fstype, options in _mounts():
            if fstype != "cgroup" or "cpu" not in options.split(","):
                continue
            root = Path(mount)
            parent = root / GROUP_PARENT / self.scope if self.scope else root / GROUP_PARENT
            parent.mkdir(parents=True, exist_ok=True)
            group = parent / f"{self.name}-{pid}"
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text("-1")
            (group / "cgroup.procs").write_text(str(pid))
            self.mechanism, self.dir, self._return_to = "cgroup1", group, root
            return True
        return False

    # -- the cap -----------------------------------------------------------------------------
    def set(self, cpus: float | None) -> CapState:
        """Cap the tree at `cpus` cores (None: uncapped)."""
        self.cpus = cpus
        if self.mechanism in ("cgroup2", "cgroup1"):
            quota = -1 if cpus is None else max(MIN_QUOTA_US, int(cpus * PERIOD_US))
            if self.mechanism == "cgroup2":
                (self.dir / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {PERIOD_US}")
            else:
                (self.dir / "cpu.cfs_quota_us").write_text(str(quota))
        elif self.pid is not None:
            self._set_affinity(cpus)
        return self.state()

    def _set_affinity(self, cpus: float | None) -> None:
        n = len(self.cpu_ids) if cpus is None else max(1, min(len(self.cpu_ids), math.ceil(cpus - 1e-9)))
        cores = self.cpu_ids[:n]
        # below one core the tree also yields to everything else on its core
        nice = 19 if cpus is not None and cpus < 0.5 else (15 if cpus is not None and cpus < 1 else None)
        for p in process_tree(self.pid):
            try:
                p.cpu_affinity(cores)
                if nice is not None and p.nice() < nice:
                    p.nice(nice)  # niceness only goes up without privileges; never lowered here
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def state(self) -> CapState:
        where = str(self.dir) if self.dir is not None else ",".join(map(str, self.cpu_ids))
        return CapState(self.mechanism, self.cpus, where)

    def release(self) -> None:
        """Move the process back and remove its group (best effort: it may be gone already)."""
        if self.dir is None:
            return
        try:
            if self.pid is not None and self._return_to is not None and psutil.pid_exists(self.pid):
                for p in process_tree(self.pid):
                    (self._return_to / "cgroup.procs").write_text(str(p.pid))
            self.dir.rmdir()
            if self.scope:  # the stack's last replica takes its scope with it
                self.dir.parent.rmdir()
        except OSError as e:
            log.debug("cpu cap release %s: %s", self.dir, e)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def remove_empty_groups(scopes: set[str] | frozenset[str] = frozenset(), now: float | None = None) -> int:
    """Remove cap groups whose processes are gone (left by killed actors): at once in `scopes` (this
    stack's), elsewhere only once STALE_GROUP_S old (another stack's replica may be about to join a
    group it has just made). Scopes left empty go too. Returns how many directories went."""
    now = time.time() if now is None else now
    mine = {_safe(s) for s in scopes}
    removed = 0
    for mount, fstype, options in _mounts():
        if fstype == "cgroup2" or (fstype == "cgroup" and "cpu" in options.split(",")):
            parent = Path(mount) / GROUP_PARENT
            if not parent.is_dir():
                continue
            for d in _subdirs(parent):  # scopes, and unscoped groups of the older layout
                ours = d.name in mine
                for group in _subdirs(d):
                    removed += _remove_if_empty(group, ours, now)
                if not _subdirs(d):
                    removed += _remove_if_empty(d, ours, now)
    return removed


def _subdirs(d: Path) -> list[Path]:
    try:
        return [c for c in d.iterdir() if c.is_dir()]
    except OSError:
        return []


def _remove_if_empty(group: Path, ours: bool, now: float) -> int:
    try:
        if (group / "cgroup.procs").read_text().strip():
            return 0
        if ours or now - group.stat().st_mtime > STALE_GROUP_S:
            group.rmdir()
            return 1
    except OSError:
        pass
    return 0
