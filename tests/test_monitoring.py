"""Monitoring: what a team sees of a run, read back from the files the run wrote.

One real 2-process SWAP run logs to an offline W&B run (module-scoped fixture); its `.wandb` record
file is parsed record by record. Two small single-process runs cover TensorBoard and `none`.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import matplotlib.image
import pytest
from launching import ROOT, launch, needs_fashion, tiny_recipe
from typer.testing import CliRunner
from wandb.proto import wandb_internal_pb2

from swap_accel.cli import app
from swap_accel.monitoring import figure
from swap_accel.monitoring.report import table_rows
from swap_accel.monitoring.tracking import _wandb_mode
from swap_accel.recipe import RecipeError, TrackingConfig, load_recipe

OFFLINE = {"WANDB_MODE": "offline"}


def wandb_records(path):
    """Records of a `.wandb` file: LevelDB-log framing (7-byte `:W&B` header, 32 KiB blocks, records
    of CRC32 + length + type, FULL/FIRST/MIDDLE/LAST chunks), each a `Record` protobuf."""
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("tracked")
    recipe = tiny_recipe(tmp, data_cache, tracking={"backend": "wandb", "averaged_curve": 1, "tags": ["test"]})
    out = tmp / "run"
    result = launch(2, recipe, out, env=OFFLINE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wandb_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    history, summary, config = [], {}, {}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "config":
            config.update(_items(record.config.update))
    return {"out": out, "results": json.loads((out / "results.json").read_text()), "history": history,
            "summary": summary, "config": config, "run_dir": wandb_file.parent, "result": result}


pytestmark = [needs_fashion, pytest.mark.slow]


def test_wandb_run_has_phase_keyed_metrics_and_config(tracked):
    r, history = tracked["results"], tracked["history"]
    phase1 = [row for row in history if row.get("phase") == 1]
    assert [row["_step"] for row in phase1] == [h["step"] for h in r["phase1"]["history"]]
    for row, logged in zip(phase1, r["phase1"]["history"], strict=True):
        assert row["phase1/train_acc"] == pytest.approx(logged["train_acc"])  # the all-reduced value
        assert row["phase1/lr"] == pytest.approx(logged["lr"]) and row["epoch"] == logged["epoch"]
        assert row["phase1/images_per_s"] > 0 and row["phase1/train_loss"] > 0
        assert row["phase1/test_acc"] == pytest.approx(logged["test_acc"])  # eval_every: 1
    assert phase1[-1]["phase1/test_acc"] == pytest.approx(r["phase1"]["test_acc"])
    config = tracked["config"]
    assert config["num_processes"] == 2 and config["recipe"]["tracking"]["backend"] == "wandb"
    assert {"torch", "accelerate", "timm", "wandb"} <= set(config["versions"]) and "device" in config["hardware"]


def test_wandb_run_has_one_series_per_worker_and_the_averaged_curve(tracked):
    r, history = tracked["results"], tracked["history"]
    epochs = r["phase2"]["epochs"]
    # Each worker's rows reach the tracker through the run directory, one row per worker and epoch,
    # each on the worker's own x-axis (worker/<k>/step = the critical-path step), whenever they arrive.
    for k in range(2):
        rows = [row for row in history if f"worker/{k}/train_loss" in row]
        assert len(rows) == epochs and all(row["phase"] == 2 for row in rows)
        logged = [h for h in r["phase2"]["workers_history"] if h["worker"] == k]
        assert [row[f"worker/{k}/step"] for row in rows] == [h["step"] for h in logged]
        assert [row[f"worker/{k}/train_acc"] for row in rows] == pytest.approx([h["train_acc"] for h in logged])
        assert [row[f"worker/{k}/test_acc"] for row in rows] == pytest.approx([h["test_acc"] for h in logged])
        assert rows[-1][f"worker/{k}/test_acc"] == pytest.approx(r["workers"][k]["test_acc"])
        assert all(row[f"worker/{k}/lr"] > 0 for row in rows)
    # averaged_curve: 1 -> a scratch average after epoch 1, then phase 3's own result at the end.
    points = r["averaged_curve"]["points"]
    assert len(points) == 2 and points[0]["seconds"] > 0 and points[-1]["source"] == "phase3"
    averaged = [row["averaged/test_acc"] for row in history if "averaged/test_acc" in row]
    assert averaged == pytest.approx([p["test_acc"] for p in points])
    assert averaged[-1] == pytest.approx(r["after_averaging"]["test_acc"])
    assert r["averaged_curve"]["seconds"] == pytest.approx(points[0]["seconds"])
    steps = [row["_step"] for row in history if "_step" in row]
    assert steps == sorted(steps)  # nothing logged below W&B's current step (it would be dropped)


def test_wandb_summary_table_and_figure(tracked):
    r, summary = tracked["results"], tracked["summary"]
    assert summary["after_averaging/test_acc"] == pytest.approx(r["after_averaging"]["test_acc"])
    assert summary["before_averaging/mean"] == pytest.approx(r["before_averaging"]["mean"])
    assert summary["phase2/seconds"] == pytest.approx(r["phase2"]["seconds"])
    # Media summaries arrive as nested keys (table1 -> _type, path, ...); the table's rows are in its file.
    assert summary["table1/_type"] == "table-file" and summary["figure1/_type"] == "image-file"
    table = json.loads((tracked["run_dir"] / "files" / summary["table1/path"]).read_text())
    assert table["columns"][0] == "method" and [tuple(row) for row in table["data"]] == table_rows(r)


def test_phase2_monitoring_makes_no_collective(tracked):
    """Monitoring exchanges files, never a collective; only the opt-in averaged curve (a scratch average
    of all workers, here after epoch 1) meets the workers, and it is counted apart."""
    collectives, out = tracked["results"]["collectives"], tracked["out"]
    assert collectives["phase2"]["calls"] == 0 and "phase2_logging" not in collectives
    assert collectives["averaged_curve"]["calls"] > 0
    for k in range(2):
        rows = [json.loads(line) for line in (out / "monitor" / f"worker{k}.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == [1, 2] and {row["worker"] for row in rows} == {k}


def test_console_main_process_only(tracked):
    stdout = tracked["result"].stdout
    assert stdout.count("phase 1 | epoch 1 |") == 1 and stdout.count("W&B: no credentials") == 0
    assert "averaged-model curve (1): 2 point(s)" in stdout


def test_figure_png_and_worker_series(tracked):
    r = tracked["results"]
    image = matplotlib.image.imread(tracked["out"] / r["figure"])
    assert image.ndim == 3 and image.shape[0] > 300
    fig = figure.draw(r)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len([line for line in lines if (line.get_gid() or "").startswith("worker")]) == 2
    assert len([line for line in lines if line.get_gid() == "averaged"]) == 1
    # Eight workers: eight series, one legend entry for all of them.
    eight = {**r, "num_processes": 8, "workers": [{**r["workers"][k % 2], "index": k} for k in range(8)],
             "phase2": {**r["phase2"], "workers_history": [{**h, "worker": k} for k in range(8)
                                                           for h in r["phase2"]["workers_history"]
                                                           if h["worker"] == k % 2]}}
    fig = figure.draw(eight)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len([line for line in lines if (line.get_gid() or "").startswith("worker")]) == 8
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert "workers 0-7" in labels and not any(label.startswith("worker ") for label in labels)


def _single_process(tmp_path, data_cache, backend: str, script: str) -> tuple:
    """A small single-process `mode: sgd` run (no launcher), trained by `script`."""
    recipe = tiny_recipe(tmp_path, data_cache, name=f"sgd_{backend}", mode="sgd", tracking={"backend": backend},
                         data={"train_subset": 504, "test_subset": 200}, phase1={"max_epochs": 2},
                         eval={"bn_samples": 500})
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, **OFFLINE, "RECIPE": str(recipe), "OUT": str(out)})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


TRAIN = ("import os, sys; from swap_accel.cli import main\n"
         "sys.argv = ['swap_accel', 'train', os.environ['RECIPE'], '--out', os.environ['OUT']]; main()")
# Trains in-process and lists the tracker modules that training imported.
TRAIN_AND_LIST_MODULES = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import swap_accel.train as t
    from swap_accel.recipe import load_recipe
    before = set(sys.modules)
    t.train(load_recipe(os.environ["RECIPE"]), Path(os.environ["OUT"]))
    new = sorted(set(sys.modules) - before)
    import wandb
    print("NEW_TRACKER_MODULES", [m for m in new if m.split(".")[0] in ("wandb", "tensorboard", "tensorboardX")
                                  or m.startswith("torch.utils.tensorboard")], wandb.run)
""")


@pytest.fixture(scope="module")
def untracked(tmp_path_factory, data_cache):
    return _single_process(tmp_path_factory.mktemp("none"), data_cache, "none", TRAIN_AND_LIST_MODULES)


def test_tensorboard_writes_event_files(tmp_path, data_cache):
    out, _ = _single_process(tmp_path, data_cache, "tensorboard", TRAIN)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = out.glob("tensorboard/swap_accel/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent)).Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"phase1/train_acc", "phase1/lr", "phase1/test_acc", "summary/test_acc"} <= scalars
    assert "figure1" in accumulator.Tags()["images"]


def test_none_imports_no_tracker(untracked):
    # timm itself imports wandb when installed (timm.utils.summary), so the check is on what training adds.
    out, result = untracked
    assert "NEW_TRACKER_MODULES [] None" in result.stdout, result.stdout[-2000:]
    assert (out / "results.json").exists() and not (out / "wandb").exists() and not (out / "tensorboard").exists()
    # A baseline is reported also after phase 3's BN recalibration.
    assert 0 < json.loads((out / "results.json").read_text())["phase1"]["test_acc_bn"] <= 1


def test_report_prints_both_runs_side_by_side(tracked, untracked):
    sgd, _ = untracked
    (tracked["out"] / "figure1.png").unlink()
    result = CliRunner().invoke(app, ["report", str(tracked["out"]), str(sgd)])
    assert result.exit_code == 0, result.stderr
    assert "SWAP (after averaging)" in result.stdout and "SGD (batch 252)" in result.stdout
    assert "sgd_none" in result.stdout and (tracked["out"] / "figure1.png").exists()  # redrawn


def test_wandb_goes_offline_by_itself_and_says_so_once(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    said = []
    accelerator = type("A", (), {"print": lambda self, *a, **k: said.append(a)})()
    assert _wandb_mode(TrackingConfig(backend="wandb"), accelerator) == "offline" and len(said) == 1
    assert _wandb_mode(TrackingConfig(backend="wandb", mode="online"), accelerator) == "online" and len(said) == 1
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_mode(TrackingConfig(backend="wandb"), accelerator) is None and len(said) == 1


def test_tracking_section_is_strict(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text((ROOT / "recipes" / "fashion_mnist.yaml").read_text())
    assert load_recipe(path, ["tracking.averaged_curve=3"]).tracking.averaged_curve == 3
    for bad in ("tracking.averaged_curve=0", "tracking.backend=mlflow", "tracking.mdoe=offline"):
        with pytest.raises(RecipeError, match="tracking"):
            load_recipe(path, [bad])
