"""One memory budget for a whole ``resunet serve`` node, shared by its worker processes.

``--max-memory-gb`` refuses, on upload and from the headers, a study whose estimated peak memory
(:meth:`resunet.io.limits.Limits.estimate_bytes`) is above the budget. With ``--workers N`` each
worker runs one case at a time, so without an accountant N workers could together need N times the
budget. :class:`MemoryBudget` is that accountant: before a worker segments a job it reserves the
job's estimate in a ledger that every worker process of the node shares, and waits (the job stays
claimed, its lease renewed) while the reservations of the others leave no room for it. A job that is
alone always runs: it was admitted against the whole budget. Jobs whose size is unknown before they
run (a PACS pull fetches its study inside the job) reserve the whole budget.

Hand-written because the workers are separate processes (each with its own warm model) and may be
restarted at any time: a ``multiprocessing`` semaphore counts slots, not bytes, and dies with its
owner's bookkeeping. The ledger is a small JSON file under an ``fcntl`` lock; entries of processes
that no longer exist are dropped on every read, so a SIGKILLed worker never leaks its reservation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from resunet.io.scratch import process_alive

#: How often a waiting worker looks at the ledger again (s).
POLL_S = 0.2


class MemoryBudget:
    """The reservations of one node's workers against ``budget_bytes``.

    Args:
        folder: where the ledger lives (the node's part of the state folder; created 0700).
        node: the node's name (one ledger per node: nodes on a shared state folder are other machines).
        budget_bytes: the node's budget for segmenting (``--max-memory-gb``).
    """

    def __init__(self, folder: Path, node: str, budget_bytes: int) -> None:
        from resunet.io.atomic import make_private
        from resunet.io.names import safe_name

        make_private(folder)
        self.path = folder / f"{safe_name(node, 'node')}.json"
        self.budget = int(budget_bytes)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            text = fh.read()
            try:
                ledger = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError:  # a torn write cannot happen under the lock; be safe anyway
                ledger = {}
            ledger = {k: v for k, v in ledger.items() if process_alive(int(v.get("pid", 0)))}
            yield ledger
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(ledger, sort_keys=True))
            fh.flush()

    def in_use(self) -> int:
        """Bytes reserved now by live workers of the node."""
        with self._locked() as ledger:
            return sum(int(v["bytes"]) for v in ledger.values())

    @contextlib.contextmanager
    def reserve(self, job_id: str, nbytes: int | None, stop: Callable[[], bool] = lambda: False,
                note: Callable[[str, dict[str, Any]], None] | None = None) -> Iterator[float]:
        """Hold ``nbytes`` (None: the whole budget) for ``job_id`` while the block runs; yields the seconds waited.

        Waits while other reservations leave less than ``nbytes`` free (a reservation alone is always
        granted). ``note(event, detail)`` is told ``memory`` when granted (before the block runs) and
        ``memory-released`` just before the reservation goes (so a log of these events never shows
        less in use than there was). ``stop()`` True ends the wait early (service shutting down): the
        block then runs anyway and the job finishes or is re-queued as usual.
        """
        want = self.budget if nbytes is None else min(int(nbytes), self.budget)
        t0 = time.monotonic()
        while True:
            with self._locked() as ledger:
                used = sum(int(v["bytes"]) for v in ledger.values() if v.get("job") != job_id)
                if not ledger or used + want <= self.budget or stop():
                    ledger[f"{os.getpid()}:{job_id}"] = {"pid": os.getpid(), "job": job_id, "bytes": want,
                                                        "since": time.time()}
                    waited = time.monotonic() - t0
                    if note is not None:
                        note("memory", {"reserved": want, "in_use_before": used, "budget": self.budget,
                                        "waited_s": round(waited, 3)})
                    break
            time.sleep(POLL_S)
        try:
            yield waited
        finally:
            with self._locked() as ledger:
                if note is not None:
                    with contextlib.suppress(Exception):
                        note("memory-released", {"released": want})
                ledger.pop(f"{os.getpid()}:{job_id}", None)
