"""SWAP end to end with real processes, real gloo collectives and real Fashion-MNIST.

One 2-process and one 3-process run (module-scoped fixtures) are inspected from their outputs:
results.json, the per-rank records and the saved worker weights.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from launching import CONSOLE_LAUNCH, LAUNCH, ROOT, free_port, launch, needs_fashion, tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

import swap_accel  # noqa: F401
from swap_accel.cli import app
from swap_accel.data.loading import load_data
from swap_accel.data.sampling import bn_order, digest, worker_order
from swap_accel.models import build_model
from swap_accel.recipe import load_recipe

pytestmark = [needs_fashion, pytest.mark.slow]


def _run(tmp_path_factory, data_cache, processes: int):
    tmp = tmp_path_factory.mktemp(f"swap{processes}")
    recipe = tiny_recipe(tmp, data_cache)
    out = tmp / "run"
    # The 2-process run through the `accelerate` console script, as the README launches (launching.LAUNCH).
    result = launch(processes, recipe, out, launcher=CONSOLE_LAUNCH if processes == 2 else LAUNCH)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"recipe": load_recipe(recipe), "out": out, "results": json.loads((out / "results.json").read_text()),
            "ranks": ranks, "stdout": result.stdout}


@pytest.fixture(scope="module")
def run2(tmp_path_factory, data_cache):
    return _run(tmp_path_factory, data_cache, 2)


@pytest.fixture(scope="module")
def run3(tmp_path_factory, data_cache):
    return _run(tmp_path_factory, data_cache, 3)


@pytest.fixture(params=["run2", "run3"])
def run(request):
    return request.getfixturevalue(request.param)


def test_results_contract(run2):
    r = run2["results"]
    assert r["mode"] == "swap" and r["num_processes"] == 2
    for key in ("epochs", "steps", "seconds", "train_acc"):
        assert key in r["phase1"]
    for key in ("epochs", "steps_per_worker", "seconds"):
        assert key in r["phase2"]
    assert r["phase3"]["seconds"] > 0 and [w["index"] for w in r["workers"]] == [0, 1]
    assert set(r["before_averaging"]) >= {"mean", "std"} and 0 < r["after_averaging"]["test_acc"] <= 1
    assert r["critical_path_steps"] == r["phase1"]["steps"] + r["phase2"]["steps_per_worker"]
    accs = [w["test_acc"] for w in r["workers"]]
    assert r["before_averaging"]["mean"] == pytest.approx(sum(accs) / len(accs))
    assert (run2["out"] / "recipe.yaml").exists() and (run2["out"] / "model.safetensors").exists()
    assert "SWAP (after averaging)" in run2["stdout"]  # the Table-1 style summary
    # Micro-batches of 42 < the per-process batch of 126 with a BN model are ghost BatchNorm, said once.
    assert run2["stdout"].count("ghost BatchNorm") == 1
    # Phase-2 seconds are the slowest process's (stragglers included), not rank 0's.
    assert r["phase2"]["seconds"] == max(sum(w["seconds"] for w in rank["phase2"]) for rank in run2["ranks"])


def test_workers_are_also_reported_after_phase3s_bn_recalibration(run2):
    """The SWAP gain "after - before" must measure averaging, not the BN re-estimation only the average got. Worker 0's
    recalibrated accuracy is recomputed here from its saved weights with the same samples, independently."""
    from accelerate import Accelerator

    from swap_accel.algorithm.bn import recalibrate_bn_
    from swap_accel.algorithm.evaluate import evaluate_local

    recipe, r = run2["recipe"], run2["results"]
    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    module.load_state_dict(load_file(run2["out"] / "workers" / "worker0.safetensors"))
    accelerator = Accelerator(cpu=True)
    recalibrate_bn_(module, load_data(recipe.data, torch.device("cpu"), split="train"), accelerator,
                    samples=recipe.eval.bn_samples, batch_size=recipe.eval.bn_batch_size, seed=recipe.seed)
    acc = evaluate_local(module, load_data(recipe.data, torch.device("cpu"), split="test"), 64, accelerator)
    assert r["workers"][0]["test_acc_bn"] == pytest.approx(acc, abs=2 / 500)  # thread count may move a sample
    bn = [w["test_acc_bn"] for w in r["workers"]]
    assert r["before_averaging_bn"]["mean"] == pytest.approx(sum(bn) / len(bn))
    assert r["averaging_gain"]["vs_recalibrated_workers"] == pytest.approx(r["test_acc"] - sum(bn) / len(bn))
    assert any("BN recomputed" in line for line in run2["stdout"].splitlines())


def test_phase1_params_bitwise_identical_across_ranks(run):
    assert len({rank["phase1"]["params"] for rank in run["ranks"]}) == 1


def test_phase1_stop_is_collective(run):
    steps = {rank["phase1"]["steps"] for rank in run["ranks"]}
    assert len(steps) == 1
    p1 = run["results"]["phase1"]
    # τ = 0.6 is reached before the 6-epoch budget on this data, so the stop really was a decision.
    assert p1["reached_tau"] and p1["epochs"] < run["recipe"].phase1.max_epochs and p1["train_acc"] >= 0.6


def test_workers_diverge_in_phase2(run):
    digests = [rank["phase2"][0]["params"] for rank in run["ranks"]]
    assert len(set(digests)) == len(digests)


def test_phase2_makes_zero_collectives(run):
    assert run["results"]["collectives"]["phase2"]["calls"] == 0
    # Everything the phase-2 loop reaches through its logger is labelled apart; pin those labels down too: no
    # averaged-curve work with the default "end", no collective in a worker of one process (monitoring
    # goes through files), and each worker's own evaluations make none either.
    assert run["results"]["collectives"]["averaged_curve"]["calls"] == 0
    assert run["results"]["collectives"]["phase2_in_group"]["calls"] == 0
    assert "phase2_logging" not in run["results"]["collectives"]
    assert all(rank["collectives"].get("phase2", {"calls": 0})["calls"] == 0 for rank in run["ranks"])
    # ... while phase 1 and 3 really communicate (the counter sees collectives at all).
    assert run["results"]["collectives"]["phase1"]["calls"] > 0
    assert run["results"]["collectives"]["phase3"]["calls"] == 2  # one flat average + one flat BN-stat sum


def test_phase1_syncs_once_per_step_and_once_per_epoch(run):
    """One gradient all-reduce per optimizer step (the tiny model fits one DDP bucket; micro-batches run under
    no_sync), one metrics all-reduce per epoch (the τ decision) and one BN-buffer broadcast when phase 1 ends.
    No per-step buffer broadcast: DDP's broadcast_buffers is off, and the results do not change."""
    p1 = run["results"]["phase1"]
    assert run["results"]["collectives"]["phase1"]["calls"] == p1["steps"] + p1["epochs"] + 1


def test_each_worker_visits_every_sample_once_per_epoch_in_its_own_order(run):
    n = run["recipe"].data.train_subset
    for worker, rank in enumerate(run["ranks"]):
        (record,) = rank["phase2"]  # W = P: worker k is rank k
        assert record["worker"] == worker and record["samples_per_epoch"] == [n] * run["recipe"].phase2.epochs
        expected = [digest(worker_order(n, seed=0, worker=worker, epoch=e)) for e in range(run["recipe"].phase2.epochs)]
        assert record["order_digests"] == expected
    first_epoch = [rank["phase2"][0]["order_digests"][0] for rank in run["ranks"]]
    assert len(set(first_epoch)) == len(first_epoch)


def test_averaged_model_is_mean_of_saved_workers(run):
    out, p = run["out"], run["results"]["num_processes"]
    workers = [load_file(out / "workers" / f"worker{k}.safetensors") for k in range(p)]
    final = load_file(out / "model.safetensors")
    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    param_names = [name for name, _ in module.named_parameters()]
    for name in param_names:
        mean = torch.stack([w[name] for w in workers]).sum(0) / p
        if p == 2:
            assert torch.equal(final[name], mean), name  # a + b is exact in either order
        else:
            # gloo's ring sum may add in another order than the test: float32 rounding only.
            torch.testing.assert_close(final[name], mean, rtol=1e-6, atol=1e-7)
        assert not torch.equal(final[name], workers[0][name])


def test_bn_statistics_equal_a_direct_full_pass(run):
    recipe = run["recipe"]
    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    module.load_state_dict(load_file(run["out"] / "model.safetensors"))
    source = load_data(recipe.data, torch.device("cpu"), split="train")
    order = bn_order(source.num_samples, seed=recipe.seed, samples=recipe.eval.bn_samples)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = {id(m): (m.running_mean.double().clone(), m.running_var.double().clone()) for m in bns}
    captured = {id(m): [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, i: captured[id(m)].append(i[0].double())) for m in bns]
    module.train()
    with torch.no_grad():
        for x, _ in source.batches(order, recipe.eval.bn_batch_size, augment=False, generator=None):
            module(x)
    for h in hooks:
        h.remove()
    for m in bns:
        x = torch.cat(captured[id(m)]).transpose(0, 1).reshape(m.num_features, -1)
        mean, var = saved[id(m)]
        torch.testing.assert_close(mean, x.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, x.var(1, correction=1), rtol=1e-5, atol=1e-6)


def test_evaluation_counts_each_test_sample_once(run3):
    # 500 test samples over 3 processes in batches of 64: the last shard is uneven and padded.
    assert run3["results"]["after_averaging"]["samples"] == 500


def test_launch_that_is_not_one_group_is_refused(tmp_path):
    # torchrun on a CPU-only machine with a plain Accelerator() starts independent single-process
    # runs (measured); swap_accel's guard must refuse that, on every rank.
    script = tmp_path / "probe.py"
    script.write_text("from accelerate import Accelerator\n"
                      "from swap_accel.parallel.distributed import require_one_group\n"
                      "require_one_group(Accelerator())\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(script)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.count("are not one group") == 2, result.stderr[-2000:]
    # ... and the toolkit's own accelerator forms a real group under the same launcher.
    script.write_text("from swap_accel.parallel.distributed import make_accelerator\na = make_accelerator()\n"
                      "assert a.num_processes == 2, a.num_processes\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(script)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_compiled_model_runs_all_three_phases_with_plain_checkpoints(tmp_path, data_cache, run2):
    """`model.compile`: the in-place compile keeps state_dict keys, so worker files and the averaged model load
    into an uncompiled model; the run trains like the eager one (same recipe, run2). The aot_eager backend traces
    the forward and backward as inductor does, without inductor's C++ code generation (about two minutes on a cold
    cache, which CI always has); what this pins is swap_accel's use of the compiled module, not torch's compiler."""
    recipe = tiny_recipe(tmp_path, data_cache, model={"compile": "aot_eager"})
    out = tmp_path / "run"
    result = launch(2, recipe, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    eager = run2["results"]
    assert abs(results["phase1"]["history"][0]["train_loss"] - eager["phase1"]["history"][0]["train_loss"]) < 0.05
    assert abs(results["test_acc"] - eager["test_acc"]) < 0.05
    expected = set(build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8}).state_dict())
    for path in [out / "model.safetensors", *(out / "workers").glob("worker*.safetensors")]:
        assert set(load_file(path)) == expected, path


def test_export_loads_back_with_timm_and_gives_the_same_logits(run2, tmp_path):
    """`swap_accel export` writes timm's hub layout: timm loads the folder with `local-dir:` and the
    model's logits equal those of the run's own model.safetensors; config.json carries what a user needs."""
    import timm

    folder = tmp_path / "export"
    done = CliRunner().invoke(app, ["export", str(run2["out"]), str(folder)])
    assert done.exit_code == 0, done.stdout + done.stderr
    config = json.loads((folder / "config.json").read_text())
    recipe, data = run2["recipe"], load_data(run2["recipe"].data, torch.device("cpu"), split="test")
    assert config["architecture"] == recipe.model.name and config["num_classes"] == data.num_classes == 10
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert config["pretrained_cfg"]["mean"] == pytest.approx(data.mean) and config["label_names"][0] == "T-shirt/top"
    card = (folder / "README.md").read_text()
    assert "SWAP (after averaging)" in card and f"{100 * run2['results']['test_acc']:.2f} %" in card

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    reference = build_model(recipe.model.name, in_chans=1, num_classes=10, kwargs=recipe.model.kwargs).eval()
    reference.load_state_dict(load_file(run2["out"] / "model.safetensors"))
    x, _ = next(data.batches(torch.arange(64), 64, augment=False, generator=None))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    # A second export into the same, now non-empty folder is refused with one line, not overwritten silently.
    again = CliRunner().invoke(app, ["export", str(run2["out"]), str(folder)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
