"""Spawned gloo process groups for the distributed tests (one harness for every such test file).

A test module defines ``TASKS = {name: fn(rank, world_size) -> picklable}``; :func:`run_group`
starts ``world_size`` fresh processes that join one gloo group and each run the named tasks, and
every rank writes its results (or its traceback) to a file the parent reads. Joins and the group
have timeouts, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import importlib
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, tasks_module, task_names, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        tasks = importlib.import_module(tasks_module).TASKS
        result = {name: tasks[name](rank, world_size) for name in task_names}
        payload = {"ok": True, "result": result}
    except BaseException:  # reported to the parent, which fails the test with it
        payload = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
        pickle.dump(payload, handle)
    dist.destroy_process_group()


def run_group(world_size: int, tasks_module: str, task_names, out_dir: Path) -> list[dict]:
    """Run each ``TASKS[name](rank, world_size)`` of module ``tasks_module`` on every rank of one
    fresh gloo group; returns one ``{name: result}`` per rank."""
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [
        context.Process(
            target=_worker,
            args=(rank, world_size, port, tasks_module, tuple(task_names), str(out_dir)),
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S}s (a hang?)"
    results = []
    for rank, proc in enumerate(procs):
        path = out_dir / f"rank{rank}.pkl"
        assert path.exists(), f"rank {rank} exited with code {proc.exitcode} and no result"
        payload = pickle.loads(path.read_bytes())
        if not payload["ok"]:
            pytest.fail(f"rank {rank} failed:\n{payload['error']}")
        results.append(payload["result"])
    return results


class GroupResults:
    """One spawned group per world size runs every task of that size (process start-up dominates
    the cost); each test reads its part. A failed group fails every test that needs it."""

    def __init__(self, tasks_module: str, group_tasks: dict[int, tuple[str, ...]], label: str):
        self.tasks_module, self.group_tasks, self.label = tasks_module, group_tasks, label
        self._results: dict[int, object] = {}

    def __call__(self, world_size: int, tmp_path_factory) -> list[dict]:
        if world_size not in self._results:
            try:
                out_dir = tmp_path_factory.mktemp(f"{self.label}{world_size}")
                self._results[world_size] = run_group(
                    world_size, self.tasks_module, self.group_tasks[world_size], out_dir
                )
            except BaseException as exc:
                self._results[world_size] = exc
        result = self._results[world_size]
        if isinstance(result, BaseException):
            raise result
        return result


def record_collectives() -> list[tuple[str, int]]:
    """Wrap ``dist.all_reduce`` / ``dist.all_gather`` in this process so that the kind and size
    (elements) of every collective issued is appended to the returned list."""
    sizes = []
    original_reduce, original_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        sizes.append(("all_reduce", tensor.numel()))
        return original_reduce(tensor, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        sizes.append(("all_gather", tensor.numel()))
        return original_gather(tensor_list, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    return sizes
