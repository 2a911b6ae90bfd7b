"""Helpers for real multi-process launches through accelerate's launch command, the launcher users use."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# Debian's dataset-fashion-mnist; the variable only lets a test point the suite at a folder without it.
FASHION = Path(os.environ.get("SWAP_ACCEL_TEST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
# accelerate's `launch` command run as its module: the parser and launch_command that `accelerate launch` runs,
# without the `accelerate` console script's start-up, which first imports every subcommand (timm among them, through
# estimate-memory): 3 s of one core before any process starts, minutes over the suite. The console script itself,
# the form the README gives, launches test_swap_multiprocess's 2-process run (CONSOLE_LAUNCH).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
CONSOLE_LAUNCH = [str(Path(sys.executable).parent / "accelerate"), "launch"]

needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_recipe(tmp: Path, cache: Path, **sections) -> Path:
    """A small real SWAP recipe on a Fashion-MNIST subset: seconds per phase on 2 CPU cores."""
    recipe = {
        "name": "tiny",
        "seed": 0,
        "model": {"name": "resnet9", "kwargs": {"base_width": 8}},
        "data": {"source": "fashion_mnist", "train_subset": 2048, "test_subset": 500, "cache_dir": str(cache),
                 "augment": {"crop_padding": 2, "flip": True, "cutout_size": 6}},
        "phase1": {"global_batch_size": 252, "micro_batch_size": 42, "max_epochs": 6, "stop_train_accuracy": 0.6,
                   "lr": {"peak": 0.4, "warmup_epochs": 1}},
        "phase2": {"per_worker_batch_size": 100, "epochs": 2, "lr": {"peak": 0.05}},
        "eval": {"batch_size": 64, "bn_samples": 1000, "bn_batch_size": 300},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(num_processes: int, recipe: Path, out: Path, *extra: str, timeout: int = 600,
           env: dict | None = None, launcher: list[str] = LAUNCH) -> subprocess.CompletedProcess:
    cmd = [*launcher, "--config_file", str(ROOT / "accelerate_config.yaml"),
           "--num_processes", str(num_processes), "--main_process_port", str(free_port()),
           "-m", "swap_accel", "train", str(recipe), "--out", str(out), *extra]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    return result


def run_on_ranks(script: str, tmp: Path, processes: int = 2) -> list[dict]:
    """Run `script` as `processes` real torchrun ranks of one group; rank r writes its JSON result to
    argv[1]/rank<r>.json. One file per rank: ranks printing to one pipe may interleave their lines (it once lost a
    CI run one rank's result)."""
    path = tmp / "on_ranks.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--master_port", str(free_port()), str(path), str(tmp)], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(processes)]


# ------------------------------------------------------------------ kill and rerun

# One thread per process in every compared run: a launcher with one local process would otherwise use two,
# and a different thread count may change float reductions inside conv kernels.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tensors_equal(a: Path, b: Path) -> list[str]:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


def train_command(recipe: Path, out: Path, *launcher: str) -> list[str]:
    return [*LAUNCH, "--config_file", str(ROOT / "accelerate_config.yaml"), *launcher,
            "-m", "swap_accel", "train", str(recipe), "--out", str(out)]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **ENV, **(env or {})})


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.02)
    kill(proc)


def kill(proc: subprocess.Popen) -> None:
    # The launcher starts its ranks in sessions of their own: SIGKILL the launcher and every rank at once, like
    # a preempted machine.
    processes = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_process, processes) if p], timeout=30)


def hang(proc: subprocess.Popen) -> None:
    """SIGSTOP a launcher's ranks: alive, holding their sockets, silent (a hung peer, which NCCL waits on)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGSTOP)


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The process of global rank `rank` among a launcher's children (torch elastic sets RANK in each)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} among the launcher's children")


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def checkpoints(out: Path, pattern: str) -> list[Path]:
    return sorted((out / "checkpoints").glob(pattern)) if (out / "checkpoints").is_dir() else []
