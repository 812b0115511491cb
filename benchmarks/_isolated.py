"""Run one zoo model's measurement in a child process, so that no model can take the run down.

A zoo benchmark builds ~180 networks one after the other. In one process its heap grows with every
model, and the kernel's OOM killer stopped ``benchmarks/zoo.py`` at model 172 of 178 with nothing
written. Here each measurement runs in a forked child (the parent has imported torch and timm but
run no op, so the fork is cheap and safe); its row comes back through a pipe. A child killed by the
kernel or past the time limit becomes a row that says so, and rows are appended to a ``.jsonl`` file
as they finish, so that a stopped run resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import signal
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from benchmarks.common import first_line

T = TypeVar("T")


def _child(conn, fn: Callable[..., dict], args: tuple, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        row = fn(*args)
    except BaseException as e:  # the parent reports it as the model's row
        row = {"status": "error", "reason": first_line(e), "traceback": traceback.format_exc()[-2000:]}
    conn.send(row)
    conn.close()


def isolated(fn: Callable[..., dict], *args: Any, timeout: float | None = None, threads: int = 1) -> dict:
    """``fn(*args)`` in a forked child; a crash, a kill or ``timeout`` seconds give an error row instead."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args, threads), daemon=True)
    child.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        child.kill()
        return {"status": "error", "reason": f"over the {timeout:g} s limit", "seconds": timeout}
    except EOFError:  # the child died without sending a row
        child.join()
        code = child.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            why = " (the kernel's OOM killer, if memory ran out)" if -code == signal.SIGKILL else ""
            return {"status": "error", "reason": f"the process was killed by {name}{why}"}
        return {"status": "error", "reason": f"the process exited with code {code} without a result"}
    finally:
        child.join(5)
        receive.close()


# Models whose default input has at least this many pixels are measured alone under --jobs.
LARGE_INPUT_PIXELS = 320 * 320


def large_input(spec: Any) -> bool:
    """Whether a zoo model's (``bconv._zoo.ZooModel``) default input is large, read from its configuration
    without building it."""
    if spec.zoo == "torchvision":
        from bconv._zoo import torchvision_input_size

        size = torchvision_input_size(spec.name)
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name)
        size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return size[-1] * size[-2] >= LARGE_INPUT_PIXELS


def measure_each(
    items: Iterable[T], run: Callable[[T], dict], jobs: int = 1, alone: Callable[[T], bool] = lambda item: False
) -> Iterator[dict]:
    """``run(item)`` for every item, ``jobs`` at once, yielding each row as it finishes (in the caller's thread).

    ``run`` starts the measurement's child itself (:func:`isolated`); the threads here only wait on their
    children. An item for which ``alone`` is true runs with nothing beside it: two large-input models at
    once outgrew a 24 GB machine, and the OOM killer then took one of them.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be an integer >= 1 (models measured at once)")
    queue = list(items)
    running: dict[concurrent.futures.Future, bool] = {}  # future -> runs alone
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while queue or running:
            while queue and len(running) < jobs and not any(running.values()):
                by_itself = alone(queue[0])
                if by_itself and running:
                    break  # wait for the others to finish first
                running[pool.submit(run, queue.pop(0))] = by_itself
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                del running[future]
                yield future.result()


class RowLog:
    """Rows appended to a ``.jsonl`` file as they finish; ``done`` are the keys already measured."""

    def __init__(self, path: Path, key: Callable[[dict], Any] = lambda r: (r["zoo"], r["model"])):
        self.path, self.key = path, key

    def rows(self) -> list[dict]:
        """Every row, the latest one of each key, in first-measured order."""
        if not self.path.exists():
            return []
        latest: dict = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                latest[self.key(row)] = row
        return list(latest.values())

    def done(self) -> set:
        return {self.key(r) for r in self.rows()}

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def start(self, resume: bool) -> None:
        """A fresh log unless resuming."""
        if not resume and self.path.exists():
            self.path.unlink()


