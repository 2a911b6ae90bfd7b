"""Threads, memory format and torch.compile on CPU.

1. P processes on C cores: one process with C threads against P concurrent processes with C/P
   threads each (swap_accel's default: `distributed.make_accelerator`), images/s combined.
2. channels-last against contiguous NCHW (the Fashion-MNIST recipe turns it on).
3. torch.compile: compile time of the first step and steady-state speed-up, hence the number of
   steps after which it pays off (off by default: a CPU quickstart is a few thousand steps).

    .venv/bin/python benchmarks/threads.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def throughput(threads: int, channels_last: bool, seconds: float, batch: int, compile_: bool = False) -> dict:
    import swap_accel  # noqa: F401
    from swap_accel.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 16})
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    step_fn = torch.compile(model) if compile_ else model

    def step():
        F.cross_entropy(step_fn(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": n * batch / elapsed, "step_s": elapsed / n, "first_step_s": first}


def concurrent(processes: int, threads: int, channels_last: bool, seconds: float, batch: int) -> float:
    cmd = [sys.executable, "-m", "benchmarks.threads", "--inner", "--threads", str(threads), "--seconds", str(seconds),
           "--batch", str(batch)] + (["--channels-last"] if channels_last else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env) for _ in range(processes)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(throughput(args.threads, args.channels_last, args.seconds, args.batch)))
        return
    from benchmarks.common import save

    cores = len(os.sched_getaffinity(0))
    rows = {}
    for cl in (False, True):
        one = concurrent(1, cores, cl, args.seconds, args.batch)
        split = concurrent(cores, 1, cl, args.seconds, args.batch)
        rows["channels_last" if cl else "nchw"] = {f"1x{cores}_threads_img_s": one, f"{cores}x1_thread_img_s": split,
                                                   "split_over_one": split / one}
        print(f"{'channels-last' if cl else 'NCHW':13}: 1 process x {cores} threads {one:6.0f} img/s | "
              f"{cores} processes x 1 thread {split:6.0f} img/s -> ratio {split / one:.2f}", flush=True)
    rows["channels_last_over_nchw"] = rows["channels_last"][f"{cores}x1_thread_img_s"] / rows["nchw"][
        f"{cores}x1_thread_img_s"]
    print(f"channels-last / NCHW with {cores} 1-thread processes: {rows['channels_last_over_nchw']:.2f}")
    if not args.skip_compile:
        eager = throughput(1, True, args.seconds, args.batch)
        compiled = throughput(1, True, args.seconds, args.batch, compile_=True)
        gain = eager["step_s"] - compiled["step_s"]
        compile_s = compiled["first_step_s"] - eager["first_step_s"]
        rows["compile"] = {"eager_step_s": eager["step_s"], "compiled_step_s": compiled["step_s"],
                           "compile_s": compile_s, "break_even_steps": compile_s / gain if gain > 0 else None}
        be = rows["compile"]["break_even_steps"]
        print(f"torch.compile: first step {compile_s:.1f} s extra, step {1000 * eager['step_s']:.1f} -> "
              f"{1000 * compiled['step_s']:.1f} ms; pays off after "
              f"{'never' if be is None else f'{be:.0f} steps'}")
    print(f"wrote {save('threads', {'cores': cores, 'batch': args.batch, **rows})}")


if __name__ == "__main__":
    main()
