"""A load test spread over several client processes, started together, with their histograms merged.

One Python process saturates a core long before a server with 256 streams
does. The processes are spawned (fork would copy grpc's threads and state,
which grpc forbids), each opens and prefills its share of the streams, they
wait for each other at a barrier, and each sends back its report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from .engine import PROGRESS_INTERVAL_S, Share, run_load, run_share
from .errors import LoadTestError, TargetUnreachable
from .report import LoadReport
from .spec import LoadSpec
from .text import load_words

# (slot, LoadReport.to_wire() or None, error message or None): what each process sends back.
_Result = tuple[int, dict[str, Any] | None, str | None]


def run_load_processes(
    spec: LoadSpec, procs: int = 1, progress: Callable[[int], None] | None = None
) -> LoadReport:
    """``run_load`` with the streams spread over ``procs`` spawned processes; blocks until done.

    ``spec.words`` is split between the processes (there are never more
    processes than streams, or than words). The processes start measuring
    together, after every stream is open and prefilled, and their histograms
    are merged. Raises ``LoadTestError`` (``TargetUnreachable`` when no server
    answers) when no process could run.
    """
    procs = max(1, min(procs, spec.streams, spec.words or spec.streams))
    if procs == 1:
        return asyncio.run(run_load(spec, progress))
    if spec.text is None:
        # Read the text once here and ship the words: the children may run where the cwd does not help.
        spec = dataclasses.replace(spec, text=load_words())
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    counts = ctx.Array("q", procs, lock=False)  # one progress counter per process
    results: Queue[_Result] = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(slot, part, share, barrier, counts, results), daemon=True)
        for slot, (part, share) in enumerate(_split(spec, procs))
    ]
    for w in workers:
        w.start()
    try:
        reports, errors = _collect(results, workers, counts, progress)
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    return _merged(reports, errors, procs)


def _split(spec: LoadSpec, procs: int) -> Iterator[tuple[LoadSpec, Share]]:
    """Each process's part of ``spec``: its streams and words, and where its streams sit in the test."""
    first = 0
    for slot in range(procs):
        streams = spec.streams // procs + (slot < spec.streams % procs)
        words = None if spec.words is None else spec.words // procs + (slot < spec.words % procs)
        yield dataclasses.replace(spec, streams=streams, words=words), Share(first, spec.streams)
        first += streams


def _worker(
    slot: int,
    spec: LoadSpec,
    share: Share,
    barrier: Barrier,
    counts: Any,  # multiprocessing.Array("q", lock=False), one progress counter per process
    results: Queue[_Result],
) -> None:
    """One client process: runs its share of the streams and sends back its report (or its error)."""

    def progress(n: int) -> None:
        counts[slot] += n  # one writer per slot: no lock needed

    def ready() -> None:
        barrier.wait(timeout=spec.reply_timeout * 4)

    try:
        report = asyncio.run(run_share(spec, share, progress, ready))
        results.put((slot, report.to_wire(), None))
    except threading.BrokenBarrierError:
        results.put((slot, None, None))  # another process failed to start: it reports why
    except Exception as exc:
        barrier.abort()  # do not leave the others waiting for this process
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, LoadTestError) else str(exc)
        results.put((slot, None, error))


def _collect(
    results: Queue[_Result],
    workers: Sequence[BaseProcess],
    counts: Any,
    progress: Callable[[int], None] | None,
) -> tuple[list[LoadReport], list[str]]:
    """Every process's report or error, passing their progress on meanwhile."""
    reports: list[LoadReport] = []
    errors: list[str] = []
    seen = 0
    pending = len(workers)
    while pending:
        try:
            _, wire, error = results.get(timeout=PROGRESS_INTERVAL_S)
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                errors.append("a load test process died without a report")
                break
        else:
            pending -= 1
            if wire is not None:
                reports.append(LoadReport.from_wire(wire))
            if error is not None:
                errors.append(error)
        if progress is not None:
            total = sum(counts)
            progress(total - seen)
            seen = total
    return reports, errors


def _merged(reports: list[LoadReport], errors: list[str], procs: int) -> LoadReport:
    """The one report of a test, or the first process's error."""
    if errors or not reports:
        if not errors:
            raise LoadTestError("the load test processes did not start together (timed out waiting)")
        raise TargetUnreachable(errors[0]) if "cannot reach" in errors[0] else LoadTestError(errors[0])
    report = reports[0]
    for other in reports[1:]:
        report.merge(other)
    report.procs = procs
    return report
