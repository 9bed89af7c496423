"""Deterministic fault injection for crash tests: ``JSARAG_FAULT=name:n`` makes the n-th arrival at the point
``name`` fail (several faults: ``a:2,b:5``); ``JSARAG_FAULT_RANK=r`` limits faults to rank ``r``.

``fault_point(name)`` SIGKILLs its own process there (a machine dying, the OOM killer, ``kill -9``); ``poisoned(name)``
answers True there (the loop then turns that micro-step's loss into NaN). Named points, in order of a step:
``step`` (after backward, before the optimizer step), ``nonfinite_loss`` (a micro-step's loss), ``eval`` (after each
evaluation batch, in the middle of an evaluation), ``checkpoint_written`` (every file of a
checkpoint written into its hidden folder, before the rename that publishes it) and ``checkpoint_renamed`` (renamed,
before ``latest`` names it). ``JSARAG_FAULT_SIGNAL=SIGTERM`` (or SIGINT) makes a fault point send that signal to
its own process instead of SIGKILL (a scheduler's preemption at a chosen moment). With ``JSARAG_FAULT`` unset a point
costs one comparison.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

from jsarag.errors import JsaragError


def _parse(spec: str | None) -> dict[str, int]:
    """Read ``name:n[,name:n...]`` into {name: n}."""
    faults: dict[str, int] = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, count = item.strip().partition(":")
        if not name or not count.isdigit() or int(count) < 1:
            raise JsaragError(f"JSARAG_FAULT: '{item}' is not name:n with n >= 1 (e.g. JSARAG_FAULT=step:3)")
        faults[name] = int(count)
    return faults


_FAULTS = _parse(os.environ.get("JSARAG_FAULT"))
_RANK = os.environ.get("JSARAG_FAULT_RANK")
_SIGNAL = os.environ.get("JSARAG_FAULT_SIGNAL", "SIGKILL")
if _SIGNAL not in ("SIGKILL", "SIGTERM", "SIGINT"):
    raise JsaragError(f"JSARAG_FAULT_SIGNAL: '{_SIGNAL}' is not SIGKILL, SIGTERM or SIGINT")
_arrivals: Counter[str] = Counter()


def poisoned(name: str) -> bool:
    """Count an arrival at ``name``; True when it is the one ``JSARAG_FAULT`` names (on the chosen rank)."""
    if not _FAULTS or name not in _FAULTS or (_RANK is not None and os.environ.get("RANK", "0") != _RANK):
        return False
    _arrivals[name] += 1
    return _arrivals[name] == _FAULTS[name]


def fault_point(name: str) -> None:
    """SIGKILL this process (or send it ``JSARAG_FAULT_SIGNAL``) at the arrival at ``name`` that ``JSARAG_FAULT``
    names."""
    if poisoned(name):
        print(f"jsarag: fault injected: {_SIGNAL} at {name}:{_FAULTS[name]} (pid {os.getpid()})", flush=True)
        os.kill(os.getpid(), getattr(signal, _SIGNAL))
