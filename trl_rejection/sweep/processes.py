"""Child processes of a sweep: at most `parallel_points` at a time, each in its own GPU slot (`CUDA_VISIBLE_DEVICES`,
its own port) with the launcher's distributed settings dropped; a pid file per running child and one lock per sweep
folder, so a rerun never redoes a folder a live process still writes.

Example:
    >>> runner = Runner(SweepConfig(parallel_points=2), train_script, eval_script)  # doctest: +SKIP
    >>> runner.env(1)["CUDA_VISIBLE_DEVICES"]  # doctest: +SKIP
    '1'
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..io import atomic_write_text, pid_alive
from .config import SweepConfig

LOCK = ".sweep_lock.json"
LAUNCHER_VARIABLES = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"})


def standalone_env() -> dict[str, str]:
    """This process's environment without the distributed settings of an `accelerate launch` (or torchrun) that
    started it: each child is its own launch."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES
            and not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "FSDP_"))}


def leave_launcher() -> bool:
    """Under a multi-process `accelerate launch`, True on the main process only (the others should exit: one process
    drives the sweep); the launcher's distributed settings are dropped from this process's environment, so parsing
    the recipes' configs here starts no process group and the children start clean."""
    main = int(os.environ.get("RANK", "0")) == 0
    clean = standalone_env()
    os.environ.clear()
    os.environ.update(clean)
    return main


def running_elsewhere(file: Path) -> int | None:
    """The pid recorded in `file` when that process still runs on this host, else None."""
    try:
        owner = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(owner.get("pid", 0)) if isinstance(owner, dict) else 0
    return pid if pid and owner.get("host") == socket.gethostname() and pid != os.getpid() and pid_alive(pid) else None


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """One sweep process per folder: refuse while another (alive) holds it; a killed one's lock is taken over."""
    file = out / LOCK
    if pid := running_elsewhere(file):
        raise UserError(f"{out} is being swept by process {pid}. Fix: wait for it to finish, or stop it first")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield
    finally:
        file.unlink(missing_ok=True)


class ChildFailed(RuntimeError):
    """A training or evaluation child process exited with an error."""


class Runner:
    """Launches child processes for jobs, at most `parallel_points` at a time, each in its own GPU slot."""

    def __init__(self, cfg: SweepConfig, train_script: Path, eval_script: Path):
        self.cfg, self.train_script, self.eval_script = cfg, train_script, eval_script
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(cfg.parallel_points):
            self.slots.put(slot)
        self.gpus = self._gpu_ids() if cfg.parallel_points > 1 else []

    def _gpu_ids(self) -> list[str]:
        """Visible GPU ids (as CUDA_VISIBLE_DEVICES names them); checked against parallel_points x gpus_per_point."""
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            return []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",")][:count] if visible else [str(i) for i in range(count)]
        need = self.cfg.parallel_points * self.cfg.gpus_per_point
        if need > len(ids):
            raise UserError(f"parallel_points={self.cfg.parallel_points} x gpus_per_point={self.cfg.gpus_per_point} "
                            f"needs {need} GPUs, {len(ids)} are visible. Fix: lower parallel_points")
        return ids

    def env(self, slot: int) -> dict[str, str]:
        """The child's environment: the sweep's (see `leave_launcher`), with its GPUs when points run side by side."""
        env = {**standalone_env(), "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            g = self.cfg.gpus_per_point
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[slot * g:(slot + 1) * g])
        return env

    def launch_args(self, slot: int) -> list[str]:
        """`accelerate launch` arguments; a parallel point on GPUs gets its own processes, GPUs and port."""
        args = list(self.cfg.launch_args)
        if self.gpus:
            args += ["--num_processes", str(self.cfg.gpus_per_point), "--gpu_ids", "all",
                     "--main_process_port", str(29500 + slot)]
        return args

    def run(self, cmd: list[str], log: Path, slot: int, running: Path) -> float:
        """Run `cmd` with its output in `log`; record its pid in `running` while it runs. Returns seconds."""
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(slot))
            with self.lock:
                self.procs.add(proc)
            atomic_write_text(running, json.dumps({"pid": proc.pid, "host": socket.gethostname(), "cmd": cmd}))
            try:
                code = proc.wait()
            finally:
                with self.lock:
                    self.procs.discard(proc)
        running.unlink(missing_ok=True)
        if code != 0:
            lines = log.read_text(errors="replace").splitlines()
            errors = [line for line in lines if line.startswith("error:")]
            reason = errors[-1] if errors else " / ".join(lines[-3:])
            raise ChildFailed(f"{Path(cmd[-3]).name} exited with status {code} ({reason}); log: {log}")
        return time.perf_counter() - start

    def stop_all(self) -> None:
        with self.lock:
            for proc in self.procs:
                proc.terminate()
