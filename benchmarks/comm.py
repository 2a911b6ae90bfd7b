"""Communication budget per phase, counted.

Runs real 2-process SWAP jobs through the public CLI for two architectures with very different
numbers of parameter tensors and reads the counted collectives from their results.json. Targets:
phase 2 exactly 0 calls; phase 3 a constant number of calls whatever the number of tensors
(flattened), with bytes close to one copy of the parameters plus the BN statistics.

    .venv/bin/python benchmarks/comm.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

import swap_accel  # noqa: F401
from benchmarks.common import save
from swap_accel.models import build_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"resnet9": {"base_width": 8}, "resnet18": {}}


def run(model: str, kwargs: dict, tmp: Path) -> dict:
    recipe = {
        "name": f"comm-{model}", "model": {"name": model, "kwargs": kwargs},
        "data": {"train_subset": 2048, "test_subset": 500},
        "phase1": {"global_batch_size": 256, "max_epochs": 1, "stop_train_accuracy": 0.99, "lr": {"peak": 0.2}},
        "phase2": {"per_worker_batch_size": 128, "epochs": 1, "lr": {"peak": 0.05}},
        "eval": {"bn_samples": 1024},
    }
    path = tmp / f"{model}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp / model
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
           "-m", "swap_accel", "train", str(path), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, kwargs in MODELS.items():
            net = build_model(model, in_chans=1, num_classes=10, kwargs=kwargs)
            params = [p for p in net.parameters()]
            bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            bn_buffer_bytes = sum(2 * m.num_features * 4 for m in bns)
            results = run(model, kwargs, Path(tmp))
            c = results["collectives"]
            rows[model] = {
                "parameter_tensors": len(params), "bn_layers": len(bns), "parameter_bytes": param_bytes,
                "bn_buffer_bytes": bn_buffer_bytes, "phase1_calls": c["phase1"]["calls"],
                "phase1_steps": results["phase1"]["steps"], "phase2_calls": c["phase2"]["calls"],
                "phase3_calls": c["phase3"]["calls"], "phase3_bytes": c["phase3"]["bytes"],
                # BN sums travel as float64 (count, sum, sum of squares per channel) for exactness: ~2x the
                # float32 buffers, still small next to the parameters.
                "phase3_bytes_over_params_plus_bn": c["phase3"]["bytes"] / (param_bytes + bn_buffer_bytes),
            }
    print(f"{'model':10} {'tensors':>8} {'p1 calls':>9} {'p1 steps':>9} {'p2 calls':>9} {'p3 calls':>9} "
          f"{'p3 MB':>8} {'p3/(params+BN)':>15}")
    for model, r in rows.items():
        print(f"{model:10} {r['parameter_tensors']:8d} {r['phase1_calls']:9d} {r['phase1_steps']:9d} "
              f"{r['phase2_calls']:9d} {r['phase3_calls']:9d} {r['phase3_bytes'] / 1e6:8.2f} "
              f"{r['phase3_bytes_over_params_plus_bn']:15.3f}")
    constant = len({r["phase3_calls"] for r in rows.values()}) == 1
    zero = all(r["phase2_calls"] == 0 for r in rows.values())
    print(f"phase 2 zero collectives: {zero}; phase 3 calls independent of tensor count: {constant}")
    print(f"wrote {save('comm', {'models': rows, 'phase2_zero': zero, 'phase3_constant': constant})}")


if __name__ == "__main__":
    main()
