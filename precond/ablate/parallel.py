"""Several runs of an ablation at once, each in its own process on the same device.

Worker ``i`` of a CUDA ablation whose device names no index uses GPU ``i mod torch.cuda.device_count()``, so
``--workers 8`` on an 8-GPU host trains eight runs at once, one per GPU. Several workers on *one* GPU gain
little: without NVIDIA MPS the processes' kernels time-slice the GPU (measured on an H100 with 8 workers of the
25M-parameter GPT: about the serial throughput, see docs/results.md). On a CPU with cores to spare they help. Each
worker process loads the task's data once and then takes the next unfinished run from a shared queue (a
``ProcessPoolExecutor`` with the ``spawn`` start method, which CUDA needs). Only the parent writes
``runs.jsonl``, so records never interleave. Results do not depend on the number of workers (each run seeds its
own model and batches, and on the CPU uses the configuration's thread count, 1 by default, as a serial run
does); wall-clock times do, which every record states in ``concurrent_runs``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import time
from typing import Any, Callable, Iterator, Optional

import torch

from precond.ablate import progress
from precond.ablate.attempt import Run, attempt_run, run_label
from precond.ablate.config import AblationConfig
from precond.ablate.store import RunStore

_worker: dict[str, Any] = {}
"""This worker process's configuration, device, loaded data and log function (set once by :func:`_start`)."""


def worker_devices(device: torch.device, workers: int, cuda_devices: int) -> list[str]:
    """The device of each worker: the GPUs in turn for ``cuda`` without an index, else ``device`` for all."""
    if device.type == "cuda" and device.index is None and cuda_devices > 1:
        return [f"cuda:{i % cuda_devices}" for i in range(workers)]
    return [str(device)] * workers


def _start(config: AblationConfig, devices: Any, workers: int, log: Callable[[str], None]) -> None:
    device_ = torch.device(devices.get())  # each worker takes the next device of the list
    if device_.type == "cuda":
        torch.cuda.set_device(device_)  # streams, events and default allocations of this worker on its own GPU
    # the configuration's count (1 per run on the CPU by default); on a GPU without one, the processes share the cores
    torch.set_num_threads(config.threads_on(device_) or max(1, (os.cpu_count() or 1) // workers))
    _worker.update(config=config, device=device_, data=config.task.load(device_), workers=workers, log=log)


def _train(run: Run, label: str, expected: Optional[float], deadline: Optional[float]) -> Optional[dict[str, Any]]:
    local_deadline = None if deadline is None else time.monotonic() + (deadline - time.time())
    return attempt_run(_worker["config"], _worker["data"], run, label, expected, local_deadline, _worker["device"],
                       _worker["log"], bars=False, concurrent_runs=_worker["workers"], announce=False)


def _picklable(log: Callable[[str], None]) -> Callable[[str], None]:
    """The parent's log function if a worker can receive it, else the plain log-line printer."""
    try:
        pickle.dumps(log)
    except (pickle.PicklingError, AttributeError, TypeError):
        return progress.log
    return log


def run_in_processes(config: AblationConfig, todo: list[Run], store: RunStore, deadline: Optional[float],
                     device: torch.device, workers: int,
                     log: Callable[[str], None]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Train ``todo`` in ``workers`` processes and yield each finished run's log label and record as soon as it
    arrives (the caller logs its line: a worker prints nothing for a run that finishes). A run is
    handed to a worker only when one is free, with the expected duration known by then (the longest finished run
    of its variant, ``store`` being updated by the caller), so the time budget is judged as in a serial ablation:
    once a run does not fit or is cut off, no further run is handed out. An error in a run is raised here after
    the records that finished before it were yielded."""
    wall_deadline = None if deadline is None else time.time() + (deadline - time.monotonic())
    queue = iter(enumerate(todo, 1))
    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    for name in worker_devices(device, workers, torch.cuda.device_count() if device.type == "cuda" else 0):
        devices.put(name)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                                                initargs=(config, devices, workers, _picklable(log))) as pool:

        labels: dict[concurrent.futures.Future, str] = {}

        def hand_out() -> Optional[concurrent.futures.Future]:
            item = next(queue, None)
            if item is None:
                return None
            index, run = item
            label = run_label(index, len(todo), run)
            future = pool.submit(_train, run, label, store.longest(run[0].spec()), wall_deadline)
            labels[future] = label
            return future

        running = {future for future in (hand_out() for _ in range(workers)) if future is not None}
        stopped = False
        while running:
            finished, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                record = future.result()
                if record is None:
                    stopped = True  # the time budget is spent: let the runs in flight end, start no more
                    continue
                yield labels.pop(future), record
                following = None if stopped else hand_out()
                if following is not None:
                    running.add(following)
