"""`swap_accel average CKPT_OR_RUN_DIR... --recipe R --out DIR`: phase 3 on any set of workers.

Phase 2 needs no worker to wait for another (paper section 3: "No synchronization between workers is
required in this phase"), so workers may run as separate jobs, on different machines, and when one dies
the others' checkpoints stay good. Any set of worker checkpoints that share one phase 1 can therefore be
averaged afterwards. This is train.py's phase 3 on checkpoints: the same mean of the weights (bitwise the
same for two workers), the same exact BatchNorm recalibration and evaluation, and the same outputs
(recipe.yaml, model.safetensors, workers/, results.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ..algorithm.evaluate import evaluate_local, evaluate_shared
from ..algorithm.phase3 import run_phase3
from ..checkpointing.files import (
    CheckpointError,
    load_weights_into,
    save_weights,
    verify_checkpoint,
    weights_identity,
    write_json,
    write_text,
)
from ..checkpointing.resume import ROOT, check_data, check_model
from ..checkpointing.rundir import check_writable
from ..checkpointing.snapshots import CycleSamples, load_flat, model_name
from ..data.loading import load_data
from ..data.provenance import provenance_sets
from ..models import build_model
from ..monitoring.report import averaging_summary, print_table, run_header
from ..parallel.counting import CollectiveCounter
from ..parallel.distributed import flat_state, load_flat_state_, make_accelerator
from ..recipe import Recipe, dump_recipe
from ..recipe.device_defaults import device_settings

_PHASES = ("setup", "phase3", "evaluation")


def resolve_workers(paths: list[Path], recipe: Recipe, precision_chosen: bool = False) -> list[tuple[Path, dict]]:
    """Verified (checkpoint, manifest) pairs: a run directory gives its finished workers (p2-w*-end), a
    checkpoint directory is taken as is (a finished worker, or the newest p2-w*-step* of one that died).
    `precision_chosen`: the user set mixed_precision on the command line, so it may differ from the workers'."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / ROOT).is_dir():
            ends = sorted((path / ROOT).glob("p2-w*-end"), key=lambda p: int(p.name[4:-4]))
            if not ends:
                raise CheckpointError(f"{path}: no worker finished phase 2 (no {ROOT}/p2-w*-end); pass worker "
                                      f"checkpoint directories instead, e.g. {path}/{ROOT}/p2-w0-step...")
            found += ends
        else:
            found.append(path)
    workers, seen = [], {}
    for path in found:
        manifest = verify_checkpoint(path)
        if manifest.get("kind") not in ("phase2", "phase2-end"):
            raise CheckpointError(f"{path} is a {manifest.get('kind')} checkpoint, not a phase-2 worker's; pass "
                                  f"{ROOT}/p2-w* directories or run directories")
        check_model(manifest, path, recipe)
        # Phase 3 recomputes BN on the recipe's training images and a greedy soup scores its held-out ones: both must
        # be the images every worker trained on, and none it did not (its manifest says which, wherever it lies).
        check_data(manifest, path, recipe, trained_by="this worker",
                   consequence="phase 3 would recompute its BN statistics on other images than it trained on",
                   missing_fix="retrain its run with this version, or leave this worker out",
                   mismatch_fix=lambda theirs, ours: (
                       f"pass the workers' own recipe (their run's recipe.yaml) or {provenance_sets(theirs)}"))
        if not precision_chosen:
            _check_precision(path, manifest, recipe)
        _sampling(path, manifest)
        # A worker is (phase-1 origin, seed, worker index): worker 0 of two --from-phase1 runs with
        # different seeds are two workers. What must not enter twice is one checkpoint, under any path.
        same = seen.get(path.resolve()) or seen.get(manifest["files"]["model.safetensors"]["sha256"])
        if same:
            raise CheckpointError(f"{path} and {same} are the same worker checkpoint; pass each worker once")
        seen[path.resolve()] = seen[manifest["files"]["model.safetensors"]["sha256"]] = path
        workers.append((path, manifest))
    # Averaging only helps models that left one phase-1 solution together (paper section 3).
    origins = {m["phase1_params"] for _, m in workers if "phase1_params" in m}
    if len(origins) > 1:
        raise CheckpointError(f"the workers start from {len(origins)} different phase-1 models; average workers "
                              "that share one phase 1 (same run, or --from-phase1 of the same run)")
    return workers


def _check_precision(path: Path, manifest: dict, recipe: Recipe) -> None:
    """Phase 3 here is train's phase 3 only in the precision the worker trained in: BN statistics recomputed and the
    average evaluated under bf16 autocast are not the fp32 ones. A shipped recipe's `auto` resolves on the machine
    that averages (bf16 on a recent GPU, fp32 on a CPU), not on the one that trained, so the recipe's precision is
    checked against the worker's manifest; memory format only reorders the same arithmetic and is not checked.
    A worker written before manifests recorded it is checked against its run's recipe.yaml where it still lies in
    its run (checkpoints/<name> under the run directory); a moved one is not checked."""
    trained = manifest.get("mixed_precision")
    run_recipe = path.parent.parent / "recipe.yaml"
    if trained is None and path.parent.name == ROOT and run_recipe.is_file():  # "no": the default before `auto`
        trained = device_settings(yaml.safe_load(run_recipe.read_text()) or {}, unset="no")["mixed_precision"]
    if trained is None or trained == recipe.mixed_precision:
        return
    raise CheckpointError(f"{path} was trained with mixed_precision {trained!r}, but this recipe averages with "
                          f"{recipe.mixed_precision!r} (a recipe's auto resolves on the machine that averages), so "
                          "phase 3 would recompute BN statistics and evaluate in another precision than the "
                          "workers'; pass the workers' own recipe (their run's recipe.yaml) or --set "
                          f"mixed_precision={trained}, or --set mixed_precision={recipe.mixed_precision} to average "
                          "in that precision on purpose")


def _sampling(path: Path, manifest: dict) -> dict[str, int] | None:
    """The phase-2 settings that decide which samples a worker had taken (snapshots.CycleSamples reads epochs, lr.cycles
    and samples_per_worker), as the worker's own run recorded them: not the --recipe's, which may differ. None for
    a finished worker, whose manifest lists its samples."""
    if manifest["kind"] == "phase2-end":
        return None
    recorded = manifest.get("sampling")
    if not recorded:
        raise CheckpointError(f"{path} does not record its run's phase-2 sampling settings (written by an older "
                              "swap_accel), so which samples it had taken is unknown; average finished workers "
                              "(p2-w*-end) instead, or retrain its run with this version")
    return recorded


def check_out(out: Path, overwrite: bool) -> None:
    check_writable(out)
    if (out / "results.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds finished results; pass --overwrite or choose --out DIR")


def _phase1_summary(path: Path, manifest: dict) -> dict:
    """A finished worker carries its phase-1 summary; a periodic checkpoint's sibling p1-end has it."""
    if "phase1" in manifest:
        return manifest["phase1"]
    sibling = path.parent / "p1-end" / "manifest.json"
    summary = json.loads(sibling.read_text())["result"] if sibling.exists() else {}
    return {"epochs": 0, "steps": 0, "seconds": 0.0, **summary}


def average(recipe: Recipe, workers: list[tuple[Path, dict]], out: Path) -> dict | None:
    started = time.perf_counter()
    accelerator = make_accelerator(recipe.mixed_precision, loss_scale=recipe.loss_scale)
    counter = CollectiveCounter().install()
    train_data = load_data(recipe.data, accelerator.device, split="train")
    test_data = load_data(recipe.data, accelerator.device, split="test")
    module = build_model(recipe.model.name, in_chans=train_data.in_chans, num_classes=train_data.num_classes,
                         kwargs=recipe.model.kwargs, image_size=train_data.image_size).to(accelerator.device)
    test_loader = accelerator.prepare(test_data.eval_loader(recipe.eval.batch_size))
    greedy = recipe.phase3.selection == "greedy"  # keeps every model's state, not only the sum
    rows, total, states, models = [], None, [], []
    for path, manifest in workers:
        load_weights_into(module, path)
        with counter.phase("evaluation"):
            acc = evaluate_local(module, test_data, recipe.eval.batch_size, accelerator)
        result = manifest["result"]
        rows.append({"index": manifest["worker"], "seed": manifest.get("seed"), "test_acc": acc,
                     "train_acc": result["train_acc"], "seconds": result["seconds"], "steps": result["steps"],
                     "checkpoint": str(path)})
        if accelerator.is_main_process:  # numbered in the order given: two runs may each have a worker 0
            save_weights(_mkdir(out / "workers") / f"worker{len(rows) - 1}.safetensors", module,
                         {"worker": str(manifest["worker"]), "seed": str(manifest.get("seed")),
                          "checkpoint": str(path)})
        # The same sums of `flat_state` as train's phase 3 (workers.py): each worker's samples (paper section 5.3)
        # summed in the order taken, the last being the checkpoint itself (already in `module`), then added to the
        # total.
        own = None
        for s, sample in enumerate([*_earlier_samples(path, manifest), path]):
            flat = flat_state(module) if sample == path else load_flat(sample, module, accelerator.device)
            own = flat.clone() if own is None else own.add_(flat)
            models.append(model_name(len(rows) - 1, s))  # workers numbered in the order given
            if greedy:
                states.append(flat)
        total = own if total is None else total.add_(own)
    holdout_loader = None if not greedy else accelerator.prepare(
        load_data(recipe.data, accelerator.device, split="holdout").eval_loader(recipe.eval.batch_size))

    def average() -> int:  # (a + b) / 2 exactly as train's phase 3: the sum above, one division
        load_flat_state_(module, total.div_(len(models)))
        return total.numel()

    with counter.phase("phase3"):
        p3 = run_phase3(module, recipe, train_data, accelerator, models=models, average=average,
                        states=lambda: states, holdout_loader=holdout_loader)
    with counter.phase("evaluation"):
        final_acc, counted = evaluate_shared(module, test_loader, accelerator)
    counter.uninstall()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    p1 = _phase1_summary(*workers[0])
    accs, steps = [r["test_acc"] for r in rows], max(r["steps"] for r in rows)
    results = {
        **run_header(recipe, accelerator, recipe.mode if recipe.phase2_runs else "swap"),
        "averaged_from": [str(p) for p, _ in workers],
        "phase1": p1,
        "phase2": {"epochs": max(m["result"]["epochs"] for _, m in workers), "steps_per_worker": steps,
                   # How the workers were laid out is not known here: timed as if they ran side by side.
                   "seconds": max(r["seconds"] for r in rows), "workers": len(rows),
                   "slowest_worker_seconds": max(r["seconds"] for r in rows),
                   "per_worker_batch_size": recipe.phase2.per_worker_batch_size if recipe.phase2 else None,
                   "history": workers[0][1]["result"]["history"]},
        "phase3": p3.summary(),
        "workers": rows, **averaging_summary(accs, final_acc, counted),
        "critical_path_steps": p1.get("steps", 0) + steps,
        "collectives": {p: {"calls": counter.calls[p], "bytes": counter.bytes[p]} for p in _PHASES},
        "total_seconds": time.perf_counter() - started,
    }
    write_text(out / "recipe.yaml", dump_recipe(recipe))
    save_weights(out / "model.safetensors", module, {"name": recipe.name, "test_acc": str(final_acc)})
    results.update(weights_identity(out / "model.safetensors"))
    write_json(out / "results.json", results)
    print_table([results])
    accelerator.end_training()
    return results


def _earlier_samples(path: Path, manifest: dict) -> list[Path]:
    """A worker's samples before the checkpoint `path` itself, verified. A finished worker lists them (the
    ends of its last S LR cycles; the last, itself, wherever it has been moved). A worker that died in phase 2 (a
    `p2-w<k>-step...` checkpoint) has the ones its own run's settings had taken by the checkpoint's epoch."""
    sampling = _sampling(path, manifest)
    if sampling is None:
        paths = [path.parent / name for name in manifest.get("samples", [path.name])[:-1]]
    else:
        taken = CycleSamples(sampling, path.parent.parent, manifest["worker"])
        paths = taken.dirs[: taken.taken_before(manifest["epoch"])]
    for sample in paths:
        verify_checkpoint(sample)
    return paths


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
