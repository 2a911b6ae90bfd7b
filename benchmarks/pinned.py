"""Pinned behaviour: the final model's `model_sha256` of the quickstart recipe and of the test suite's recipe forms.

A restructuring of the training code must leave every one of these bitwise the same on the same machine: run it
before (`--write`, which commits benchmarks/results/pinned.json) and after (`--check`, exit 1 on any difference).
The hashes hold for one machine and torch build; on another, write them first, from the reference commit (a git
worktree of it), then check the new code against them. The file records the CPU (its kernel dispatch level and flags):
a new machine can round differently while its platform string barely changes, and `--check` says when they differ.

    .venv/bin/python -m benchmarks.pinned --write     # about 10 min on 2 cores (the quickstart is 7)
    .venv/bin/python -m benchmarks.pinned --check
    .venv/bin/python -m benchmarks.pinned --check --skip-quickstart   # the test recipes only, about 3 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RESULTS, save
from tests.launching import FASHION, launch, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
# The test suite's recipe in the forms its tests launch: W = P, workers in turn, one group of both processes, the
# SGD baseline and SWA's cyclic samples.
FORMS = {
    "tiny-w2": {},
    "tiny-w4-in-turn": {"phase2": {"workers": 4}},
    "tiny-w1-group": {"phase2": {"workers": 1}},
    "tiny-sgd": {"mode": "sgd", "phase1": {"max_epochs": 2}},
    "tiny-swa": {"mode": "swa", "phase2": {"workers": 1, "epochs": 2, "samples_per_worker": 2,
                                           "lr": {"peak": 0.05, "cycles": 2}}},
}


def measure(skip_quickstart: bool) -> dict[str, str]:
    hashes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = []
        for name, sections in FORMS.items():
            (tmp / name).mkdir()
            runs.append((name, tiny_recipe(tmp / name, tmp / "cache", **sections)))
        if not skip_quickstart:
            runs.append(("quickstart", ROOT / "recipes" / "fashion_mnist.yaml"))
        for name, recipe in runs:
            done = launch(2, recipe, tmp / f"{name}-run", timeout=1800)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            hashes[name] = json.loads((tmp / f"{name}-run" / "results.json").read_text())["model_sha256"]
            print(f"{name}: {hashes[name]}", flush=True)
    return hashes


def cpu_identity() -> dict[str, str]:
    """What decides the CPU kernels a run takes, hence its rounding: torch's dispatch level, the model name and a
    digest of the feature flags (a platform string that differs in a kernel build tag says nothing about them)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []

    def field(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in info if line.split(":", 1)[0].strip() == key), "")

    flags = " ".join(sorted(field("flags").split()))
    return {"capability": torch.backends.cpu.get_cpu_capability(), "model": field("model name"),
            "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help="Measure and write benchmarks/results/pinned.json.")
    what.add_argument("--check", action="store_true", help="Measure and compare with benchmarks/results/pinned.json.")
    parser.add_argument("--skip-quickstart", action="store_true", help="Only the test recipes (--check).")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST is not installed at {FASHION}: run bash .ci/setup")
    hashes = measure(args.skip_quickstart and args.check)
    if args.write:
        print(f"wrote {save('pinned', {'cpu': cpu_identity(), 'model_sha256': hashes})}")
        return
    record, cpu = json.loads((RESULTS / "pinned.json").read_text()), cpu_identity()
    pinned = record["model_sha256"]
    if record.get("cpu") != cpu:
        print(f"note: pinned on another CPU ({record.get('cpu', 'not recorded')}; this one {cpu}), whose "
              "kernels may round differently: write the hashes here from the reference commit, then check again")
    changed = {name: (pinned.get(name), value) for name, value in hashes.items() if pinned.get(name) != value}
    for name, (before, after) in changed.items():
        print(f"CHANGED {name}: pinned {before}, now {after}")
    print(f"{len(hashes) - len(changed)} of {len(hashes)} bitwise as pinned")
    sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
