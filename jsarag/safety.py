"""Run safety: what a training run checks and holds before any model loads, and how it stops on a signal.

- ``prepare_output_dir``: output_dir must be a folder this process can create and write into; otherwise one line
  naming the path and the fix (it is a file, its parent is read-only, it is read-only).
- ``lock_output_dir``: an exclusive ``fcntl.flock`` on ``<output_dir>/.jsarag-lock``, held by rank 0 for the rest
  of the process. A second run on the same folder refuses at once, naming the holder's pid, host and command. The
  kernel drops the lock when its holder dies, however it dies, so a lock left by a killed run is taken over (the
  file still names the dead holder, which is how a stale lock is told from a released one, emptied on release).
- ``resume_changes``: every checkpoint records the resolved recipe (every default filled) and the number of ranks;
  a run that would resume from it with other values refuses, listing the keys that differ, unless they are safe to
  change (``FORCEABLE``) and the recipe says ``resume: force``.
- ``GracefulStop``: during training SIGINT and SIGTERM only set a flag. The ranks agree on it (a collective) at the
  end of each optimizer step and between evaluation batches: the step in progress is finished, an evaluation in
  progress is abandoned (it is redone on resume), a checkpoint is written and the process exits 130 (SIGINT) or 143
  (SIGTERM). If that takes longer than ``train.grace_seconds``, or a second Ctrl-C comes, the process exits at once
  without a checkpoint (the previous one is intact).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from jsarag.errors import RecipeError, TrainingError

log = logging.getLogger("jsarag.safety")
LOCK_FILE = ".jsarag-lock"
# keys a resumed run ignores: where the run lives and how this invocation ends, not what it computes
NOT_COMPARED = ("output_dir", "resume", "train.stop_at", "train.checkpoint_every", "train.keep_checkpoints",
                "train.max_nonfinite", "train.grace_seconds")
# keys ``resume: force`` may change: how long to train (the learning-rate schedule follows), what to evaluate and
# who watches; every other key changes what the checkpoint's models, optimizer or data order mean
FORCEABLE = ("train.max_steps", "train.eval_every", "eval", "observers", "data.eval_splits")
COMPONENT_SECTIONS = ("retriever", "posterior", "index", "generator", "estimator")
SHOWN_CHANGES = 12  # keys listed in a refusal
SHOWN_VALUE = 160  # characters of a value in a refusal (a path whole, mostly)


class StopRequested(Exception):
    """Every rank agreed to stop on a signal (training's control flow, never shown to users)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.rng: dict[str, Any] | None = None  # the random states before an abandoned evaluation, if any


# -- output_dir -----------------------------------------------------------------------------------------------------

def prepare_output_dir(folder: Path) -> None:
    """Create output_dir if needed and check this process can write into it; a RecipeError naming the path and the
    fix otherwise."""
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"output_dir: {folder} is a file, not a folder; choose another output_dir or move the file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = _nearest_existing(folder)
        if blocker is not None and not blocker.is_dir():
            raise RecipeError(f"output_dir: cannot create {folder}: {blocker} is a file, not a folder; choose another "
                              "output_dir") from None
        raise RecipeError(f"output_dir: cannot create {folder}: {_reason(exc)} in {blocker}; choose an output_dir "
                          f"in a folder you can write to, or make {blocker} writable") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".jsarag-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RecipeError(f"output_dir: {folder} is not writable ({_reason(exc)}); fix its permissions (chmod u+w "
                          f"{folder}) or choose another output_dir") from None


def _nearest_existing(path: Path) -> Path | None:
    """The path itself or its nearest ancestor that exists."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def _reason(exc: OSError) -> str:
    """A failed write in a few words."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    return exc.strerror or str(exc)


# -- the lock -------------------------------------------------------------------------------------------------------

_held: dict[Path, int] = {}  # resolved output_dir -> descriptor of the lock this process holds


def lock_output_dir(folder: Path, command: str | None = None) -> None:
    """Hold an exclusive lock on output_dir for the rest of this process (or until ``unlock_output_dir``); a run
    already holding it is a TrainingError naming its pid, host and command. Holding it again in the same process is
    a no-op."""
    import fcntl

    key = folder.resolve()
    if key in _held:
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(_read_holder(fd))
        os.close(fd)
        raise TrainingError(f"output_dir {folder} is in use by another run ({holder}); two runs in one folder would "
                            "mix their checkpoints and logs. Wait for it to end or stop it, or choose another "
                            "output_dir") from None
    except OSError as exc:  # a file system without flock (some network mounts)
        os.close(fd)
        log.warning("%s: cannot lock (%s): nothing stops a second run from using this output_dir", path, _reason(exc))
        return
    previous = _read_holder(fd)
    if previous:
        log.warning("%s: taking over the lock of a run that is gone (%s)", path, _describe(previous))
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": command if command is not None else " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held[key] = fd


def unlock_output_dir(folder: Path) -> None:
    """Release the lock ``lock_output_dir`` took (emptied first, so that the next holder sees no stale lock)."""
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


def release_locks() -> None:
    """Release every output_dir lock this process holds (before it exits)."""
    for fd in _held.values():
        os.ftruncate(fd, 0)
        os.close(fd)
    _held.clear()


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder recorded in a lock file (None when empty or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "its pid is not recorded"
    command = str(holder.get("command", ""))
    command = command if len(command) <= 120 else command[:120] + "..."
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: {command}"


# -- resuming with another recipe -----------------------------------------------------------------------------------

def flat_recipe(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved recipe as dotted keys, as a user writes them: ``generator.lr``, ``estimator.name``, ``train.seed``
    (a component's options sit beside its name; observers compare as one list)."""
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for name, child in value.items():
                walk(child, f"{key}.{name}" if key else name)
        else:
            flat[key] = value

    for section, value in resolved.items():
        if section in COMPONENT_SECTIONS and isinstance(value, dict):
            flat[f"{section}.name"] = "prior" if value.get("shares_prior") else value["name"]
            walk(value["options"], section)
        elif section == "observers":
            flat[section] = [spec["name"] if not spec["options"] else {spec["name"]: spec["options"]} for spec in value]
        else:
            walk(value, section)
    return flat


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between two resolved recipes (``NOT_COMPARED`` left out), old and new; a
    component whose plugin changed shows only its ``name``."""
    old, new = flat_recipe(saved), flat_recipe(current)
    renamed = {key.removesuffix(".name") for key in new if key.endswith(".name") and old.get(key) != new[key]}
    changes = {}
    for key in dict.fromkeys([*old, *new]):
        section = key.split(".")[0]
        if _matches(key, NOT_COMPARED) or (section in renamed and key != f"{section}.name"):
            continue
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            changes[key] = (old.get(key, _UNSET), new.get(key, _UNSET))
    return changes


_UNSET = "(unset)"


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume(checkpoint_record: dict[str, Any] | None, current: dict[str, Any], ranks: int, mode: str,
                 where: str) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume a checkpoint (``where``) written with another recipe or number of ranks (a RecipeError with
    the keys that differ and what to do), unless every difference is forceable and ``mode`` is ``force``; return the
    changes accepted."""
    if checkpoint_record is None:
        log.warning("%s records no recipe (written by an older jsarag): resuming without checking it", where)
        return {}
    changes = recipe_changes(checkpoint_record["recipe"], current)
    if checkpoint_record["ranks"] != ranks:
        changes["ranks"] = (checkpoint_record["ranks"], ranks)
    if not changes:
        return {}
    fixed = [key for key in changes if not _matches(key, FORCEABLE)]
    if mode == "force" and not fixed:
        log.warning("resume: force: continuing %s with %s", where,
                    "; ".join(f"{key} {_shown(a)} -> {_shown(b)}" for key, (a, b) in changes.items()))
        return changes
    count = f"{len(changes)} key{'s' if len(changes) > 1 else ''} differ{'s' if len(changes) == 1 else ''}"
    error = RecipeError(f"{where} was written by a run with another recipe ({count}); resuming would mix the two")
    for key, (a, b) in list(changes.items())[:SHOWN_CHANGES]:
        error.add_note(f"{key}: {_shown(a)} -> {_shown(b)}")
    if len(changes) > SHOWN_CHANGES:
        error.add_note(f"... and {len(changes) - SHOWN_CHANGES} more")
    safe = ", ".join(f"{p}.*" if p in ("eval",) else p for p in FORCEABLE)
    if fixed:
        error.add_note(f"{', '.join(fixed[:4])}{' ...' if len(fixed) > 4 else ''} cannot change in a resumed run: "
                       "choose another output_dir for this recipe, or put them back to continue the run "
                       f"(resume: force accepts changes of {safe} only)")
    else:
        error.add_note(f"to continue the run with {'these changes' if len(changes) > 1 else 'this change'} set "
                       "resume: force (safe to change: " + safe + "); to start afresh choose another output_dir")
    raise error


def _shown(value: Any) -> str:
    text = value if value == _UNSET else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOWN_VALUE else text[:SHOWN_VALUE] + "..."


# -- signals --------------------------------------------------------------------------------------------------------

_active: GracefulStop | None = None  # the stop handling of the training in progress, if any


class GracefulStop:
    """While active (a ``with`` block around training), SIGINT and SIGTERM ask every rank to stop after the current
    step; ``agreed`` is where the ranks learn it. ``give_up(reason)`` is called on the handling thread when the grace
    period runs out or a second Ctrl-C comes; it must end the process."""

    def __init__(self, grace_seconds: float, give_up: Callable[[str, int], None]) -> None:
        self.grace_seconds = grace_seconds
        self.give_up = give_up
        self.signum: int | None = None
        self.received_at = 0.0
        self.saved: dict[int, Any] = {}
        self.timer: threading.Timer | None = None

    def __enter__(self) -> GracefulStop:
        global _active
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        _active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        self.settle()
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        _active = None

    def settle(self) -> None:
        """The stop's checkpoint is written: the grace period no longer runs."""
        if self.timer is not None:
            self.timer.cancel()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            again = "; Ctrl-C again stops at once without one" if signum == signal.SIGINT else ""
            log.warning("%s: finishing the current step, then writing a checkpoint (within train.grace_seconds: "
                        "%g s%s)", name, self.grace_seconds, again)
            self.timer = threading.Timer(self.grace_seconds, self.give_up,
                                         (f"no checkpoint within train.grace_seconds ({self.grace_seconds:g} s) of "
                                          f"{name}", 128 + signum))
            self.timer.daemon = True
            self.timer.start()
        elif signum == signal.SIGINT and time.monotonic() - self.received_at > 1.0:  # not the launcher's echo
            self.give_up("a second SIGINT", 128 + self.signum)

    def agreed(self, world_size: int) -> int | None:
        """The signal every rank now knows of (the larger number when ranks got different ones), None if none: a
        collective when there are several ranks."""
        mine = self.signum or 0
        if world_size > 1:
            from jsarag.engine import all_ranks_max

            mine = int(all_ranks_max(mine))
        return mine or None


def stop_agreed(world_size: int) -> None:
    """Raise StopRequested on every rank once the ranks agree a signal came (a collective while training runs with
    several ranks; nothing outside training)."""
    if _active is not None:
        signum = _active.agreed(world_size)
        if signum is not None:
            raise StopRequested(signum)
