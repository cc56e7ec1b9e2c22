"""Processes for training: relaunching through torchrun, joining the process group, collectives.

``coca train --gpus N`` starts ``python -m torch.distributed.run --nproc_per_node N -m coca_cli
train ...`` (the same options, minus ``--gpus``) unless it already runs under a launcher:
torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) or SLURM with several tasks
(``SLURM_PROCID``, ``SLURM_NTASKS`` > 1). Each process then joins the group with NCCL on CUDA,
gloo on CPU. With ``--gpus`` on CPU, N is a number of processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..devices import pick_device
from ..errors import CocaError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun(env=os.environ) -> bool:
    return all(name in env for name in TORCHRUN_VARS)


def under_slurm(env=os.environ) -> bool:
    """A multi-task SLURM step (``srun --ntasks N``); a single task may still relaunch."""
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1


def launched(env=os.environ) -> bool:
    """True when a launcher already started one process per rank: never relaunch then."""
    return under_torchrun(env) or under_slurm(env)


def default_processes() -> int:
    """All visible GPUs, or one process without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def default_workers(most: int = 4, env=os.environ) -> int:
    """Data loading processes per training process: ``most``, but no more than this process's
    share of the CPUs it may run on (beyond that they only compete for cores, and torch warns)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(env.get("LOCAL_WORLD_SIZE") or 1)  # set by torchrun: the ranks on this machine
    return max(1, min(most, cpus // processes))


def torchrun_command(args: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: Optional[str] = None, master_port: int = 29500) -> list[str]:
    """The torchrun command line running ``coca <args>`` in each of ``nproc`` local processes
    (torchrun as ``train.torchrun`` runs it: no traceback when a process fails)."""
    cmd = [sys.executable, "-m", "coca_cli.train.torchrun", "--nproc_per_node", str(nproc)]
    if nnodes == 1 and master_addr is None:
        cmd += ["--standalone"]  # a free local port: several runs can share a machine
    else:
        if nnodes > 1 and master_addr is None:
            raise CocaError("--nnodes > 1 needs --master-addr (the address of the node with --node-rank 0)")
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank),
                "--master_addr", master_addr or "127.0.0.1", "--master_port", str(master_port)]
    return cmd + ["-m", "coca_cli", *args]


def relaunch(args: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
             master_addr: Optional[str] = None, master_port: int = 29500) -> int:
    """Run ``coca <args>`` under torchrun and return its exit code.

    The child runs in its own session so that a Ctrl-C reaches it once, forwarded from here;
    SIGTERM (preemption) is forwarded the same way and the ranks save a checkpoint.
    """
    cmd = torchrun_command(args, nproc, nnodes, node_rank, master_addr, master_port)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the workers import this very package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        # after a signal, say which (143: SIGTERM, 130: Ctrl-C) whatever the processes made of it
        return 128 + received[0] if code and received else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``pick_device``'s choice; CUDA without an index is this process's GPU (``local_rank``)."""
    device = torch.device(pick_device(name, mps=not distributed))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif distributed and device.type != "cpu":
        raise CocaError(f"distributed training runs on CUDA or CPU, not {device.type}")
    return device


def process_place(env=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process as torchrun or SLURM set it; (0, 1, 0) alone."""
    if under_torchrun(env):
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if under_slurm(env):
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def init(device: str = "auto", timeout_minutes: float = 30) -> World:
    """Join the process group when started by torchrun or SLURM; a single process otherwise."""
    env = os.environ
    if not launched(env):
        return World(device=resolve_device(device))
    rank, world_size, local_rank = process_place(env)
    if under_torchrun(env):
        init_method = "env://"
    else:
        if "MASTER_ADDR" not in env:
            raise CocaError("under SLURM, export MASTER_ADDR (the first node's address) and MASTER_PORT before srun")
        init_method = f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
    torch_device = resolve_device(device, local_rank, distributed=world_size > 1)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return World(rank, local_rank, world_size, torch_device)


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives that are no-ops in a single process ------------------------------------------

def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's value on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, world: World) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
