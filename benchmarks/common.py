"""Shared pieces of the benchmarks: real Fashion-MNIST in memory, the recipe objects, result files.

Benchmarks measure two things side by side in one run and print their ratio: this machine
is shared and noisy, so no absolute time is a pass/fail criterion. Rounds alternate A and B and the
median of each is compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import swap_accel
from swap_accel.data.loading import load_data
from swap_accel.recipe import DataConfig

RESULTS = Path(__file__).resolve().parent / "results"


def fashion(device: torch.device, train_subset: int | None = None, augment: bool = True):
    cfg = DataConfig(train_subset=train_subset)
    if not augment:
        cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"crop_padding": 0, "flip": False,
                                                                               "cutout_size": 0})})
    return load_data(cfg, device, split="train")


def median_time(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed(fn, sync=None) -> float:
    """Seconds of one call of `fn`; `sync()` (a device's) runs before each clock read, so queued device work is
    counted where it was launched."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def alternate_samples(fns, rounds: int, sync=None) -> list[list[float]]:
    """Seconds of every call of each of `fns`, run in turn (ABC ABC ...) so drift hits all alike."""
    seconds = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, seconds, strict=True):
            out.append(timed(fn, sync))
    return seconds


def alternate(a, b, rounds: int) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, run alternately (ABAB...) so drift hits both alike."""
    ta, tb = alternate_samples((a, b), rounds)
    return statistics.median(ta), statistics.median(tb)


def loop_harness(accelerator, *sets: str):
    """What swap_accel's phase loops need around them when a benchmark times them: the quickstart recipe (tracking,
    evaluation and the averaged curve off, plus `sets`) and a Checkpointer in a scratch directory, with the
    recipe's checkpoint policy, so its per-step cost is timed too."""
    import tempfile

    from swap_accel.checkpointing.saver import Checkpointer
    from swap_accel.recipe import load_recipe

    recipe = load_recipe(RESULTS.parents[1] / "recipes" / "fashion_mnist.yaml",
                         ["tracking.backend=none", "tracking.eval_every=0", "tracking.averaged_curve=off", *sets])
    return recipe, Checkpointer(Path(tempfile.mkdtemp()), recipe, accelerator)


def loop_context(accelerator, recipe, ckpt, module, source, optimizer, *, phase: int, counter=None):
    """The LoopContext swap_accel's phase loops get when a benchmark times them: seed 0, `optimizer` settings, and a
    Monitor with progress and logging points on `source`, no evaluation, no tracker. Phase 2's monitor knows the
    recipe's worker layout and the run directory, as a worker's does."""
    from swap_accel.algorithm.loop import LoopContext
    from swap_accel.monitoring.monitor import Monitor
    from swap_accel.monitoring.progress import Progress
    from swap_accel.parallel.counting import CollectiveCounter

    worker = {"layout": recipe.worker_layout(accelerator.num_processes), "run_dir": ckpt.root.parent} \
        if phase == 2 else {}
    log = Monitor(accelerator=accelerator, recipe=recipe, counter=counter or CollectiveCounter(), module=module,
                  train_data=source, test_data=source, test_loader=None, progress=Progress(accelerator), **worker)
    return LoopContext(accelerator, source, optimizer, 0, log, ckpt)


def gpu_parser(doc: str, *, dry_run_help: str) -> argparse.ArgumentParser:
    """The arguments the GPU benchmarks share: --rounds (alternating blocks, at least 5), --dry-run, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="Alternating blocks per side (default 5, at least 5).")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--out", type=Path, help="Write the JSON here instead of benchmarks/results/.")
    return parser


def gpu_args(parser: argparse.ArgumentParser, module: str) -> argparse.Namespace:
    """Parsed arguments, refused in one line where a GPU run cannot be measured as the docs say."""
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"{module} measures a GPU; on a CPU run `python -m benchmarks.{module} --dry-run`")
    if not args.dry_run and args.rounds < 5:
        raise SystemExit("--rounds: at least 5 alternating rounds, so that one noisy block cannot decide a ratio")
    return args


def write_gpu_result(name: str, args: argparse.Namespace, payload: dict) -> None:
    """The run's JSON, with the device and date: to --out if given, else benchmarks/results/<name>_<gpu>.json for a
    GPU run (a dry run without --out writes nothing)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu (dry run)"
    payload = {"device": device, **payload, "date": time.strftime("%Y-%m-%d")}
    if args.out:  # on_gpu.sh's path: the same versions and platform as a committed result
        write_json(args.out, stamped(name, payload))
    elif not args.dry_run:
        print(f"wrote {save(name + '_' + device.split()[-1].lower(), payload)}")


def stamped(name: str, payload: dict) -> dict:
    """`payload` with what it was measured with: the benchmark, swap_accel's and torch's versions, the platform."""
    return {"benchmark": name, "swap_accel": swap_accel.__version__, "torch": torch.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads(), **payload}


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save(name: str, payload: dict) -> Path:
    return write_json(RESULTS / f"{name}.json", stamped(name, payload))


def marked_file(marker: str) -> Path:
    """The one Markdown file, README.md or a page under docs/, that holds `<!-- marker:begin -->`: the numbers
    live wherever the documentation shows them, and re-rendering finds them there."""
    root = RESULTS.parents[1]
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    holders = [path for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
               if path.is_file() and begin in path.read_text()]
    if len(holders) != 1:
        where = ", ".join(str(p.relative_to(root)) for p in holders) or "none of README.md and docs/*.md"
        raise RuntimeError(f"benchmark block '{marker}': exactly one of README.md and docs/*.md must hold the line "
                           f"{begin} (and {end}), found in {where}")
    text = holders[0].read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(end) < text.index(begin):
        raise RuntimeError(f"benchmark block '{marker}' in {holders[0].relative_to(root)}: needs one {begin} "
                           f"followed by one {end}")
    return holders[0]


def replace_block(marker: str, body: str) -> Path:
    """Put `body` between the `<!-- marker:begin -->` and `<!-- marker:end -->` lines of the one file, README.md or
    docs/*.md, that holds them (`marked_file`): the documented benchmark numbers are written by the benchmark that
    measured them, never typed."""
    path = marked_file(marker)
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text()
    path.write_text(text[: text.index(begin)] + f"{begin}\n{body}\n{end}" + text[text.index(end) + len(end):])
    return path
