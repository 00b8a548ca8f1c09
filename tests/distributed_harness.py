"""Run a function on ``W`` CPU processes joined by a gloo process group, one thread each, and collect what each rank
returns (``torch.save``-able). A rank that fails fails the test with its traceback; a hang fails it after
``timeout`` seconds instead of blocking CI (the processes are ended by their ids)."""

from __future__ import annotations

import datetime
import importlib
import os
import pathlib
import tempfile
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, module: str, name: str, args: tuple, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = pathlib.Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        result = getattr(importlib.import_module(module), name)(rank, world, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # reported to the test, which fails with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, module: str, name: str, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``module.name(rank, world, *args)`` on ``world`` processes; returns the per-rank results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        context = mp.start_processes(_entry, args=(world, init_file, module, name, args, tmp), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    failure = f"{name} on {world} ranks did not finish within {timeout:.0f} s"
                    break
        except mp.ProcessRaisedException as error:
            failure = str(error)
        except mp.ProcessExitedException as error:
            failure = str(error)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        results = []
        for rank in range(world):
            path = pathlib.Path(tmp) / f"rank{rank}.pt"
            saved = torch.load(path, weights_only=False) if path.exists() else None
            if saved is None or not saved["ok"]:
                failure = failure or (saved["error"] if saved else f"rank {rank} left no result")
            else:
                results.append(saved["result"])
        if failure:
            raise AssertionError(f"distributed run failed:\n{failure}")
        return results
