"""BatchNorm recalibration with P processes against one process over the same samples.

Target: time with P processes ≤ 1/P + 10% of the single-process time, statistics identical (up to
float64 summation order). Each configuration is a real `accelerate launch` whose processes get one
thread each (one device per process, as on GPUs); rounds alternate the configurations. The timed
part is `recalibrate_bn_` alone, after a warm-up pass, inside the launched job.

    .venv/bin/python benchmarks/bn.py [--samples 20000 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def inner(args) -> None:
    from benchmarks.common import fashion
    from swap_accel.algorithm.bn import bn_layers, recalibrate_bn_
    from swap_accel.models import build_model
    from swap_accel.parallel.distributed import make_accelerator

    accelerator = make_accelerator()
    torch.manual_seed(0)
    model = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 16}).to(
        memory_format=torch.channels_last)
    source = fashion(accelerator.device)
    kwargs = {"samples": args.samples, "batch_size": 500, "seed": 0}
    recalibrate_bn_(model, source, accelerator, **{**kwargs, "samples": 1000})  # warm-up
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    recalibrate_bn_(model, source, accelerator, **kwargs)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        stats = {f"{i}.{k}": getattr(m, k).clone() for i, m in enumerate(bn_layers(model))
                 for k in ("running_mean", "running_var")}
        save_file(stats, args.out)
        Path(args.out + ".json").write_text(json.dumps({"seconds": seconds}))
    accelerator.end_training()


def launch(processes: int, samples: int, out: str) -> float:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_config.yaml"), "--num_processes", str(processes), "-m", "benchmarks.bn", "--inner",
           "--samples", str(samples), "--out", out]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(Path(out + ".json").read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", action="store_true")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    from benchmarks.common import save

    times = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for p in times:
                times[p].append(launch(p, args.samples, f"{tmp}/p{p}.safetensors"))
        one, many = load_file(f"{tmp}/p1.safetensors"), load_file(f"{tmp}/p{args.processes}.safetensors")
        max_rel = max(((one[k] - many[k]).abs() / one[k].abs().clamp_min(1e-12)).max().item() for k in one)
    t1, tp = statistics.median(times[1]), statistics.median(times[args.processes])
    p = args.processes
    row = {"samples": args.samples, "processes": p, "single_process_s": t1, "multi_process_s": tp,
           "ratio": tp / t1, "target_ratio": 1 / p + 0.10, "max_relative_stat_difference": max_rel}
    print(f"BN recalibration over {args.samples} samples: 1 process {t1:.2f} s, {p} processes {tp:.2f} s -> "
          f"ratio {tp / t1:.3f} (target <= {1 / p + 0.10:.3f}); max relative difference of statistics {max_rel:.2e}")
    print(f"wrote {save('bn', row)}")


if __name__ == "__main__":
    main()
