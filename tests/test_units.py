"""Unit tests: schedules, the recipe schema, the model registry, sample orders."""

from pathlib import Path

import pytest
import timm
import torch
import yaml

import swap_accel  # noqa: F401  (registers resnet9)
from swap_accel.algorithm.schedules import lr_at_epoch, make_schedule
from swap_accel.checkpointing.files import CheckpointError
from swap_accel.checkpointing.rundir import check_run_dir, recipe_difference
from swap_accel.data.sampling import PHASE1, bn_order, bn_shard, derive_seed, phase1_shard, worker_order
from swap_accel.models import ModelError, build_model, check_compile_backend, check_model_name, compile_in_place
from swap_accel.recipe import LRConfig, RecipeError, device_defaults, dump_recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# --- schedules -------------------------------------------------------------------------------

def test_linear_warmup_then_decay_to_zero():
    f = lambda e: lr_at_epoch(e, peak=1.2, warmup_epochs=30, total_epochs=150, shape="linear")  # noqa: E731
    assert f(0) == 0 and f(15) == pytest.approx(0.6) and f(30) == pytest.approx(1.2)
    assert f(90) == pytest.approx(0.6) and f(150) == pytest.approx(0.0) and f(200) == pytest.approx(0.0)


def test_cosine_shape_and_midpoint_steps():
    assert lr_at_epoch(5, peak=1.0, warmup_epochs=0, total_epochs=10, shape="cosine") == pytest.approx(0.5)
    lr_at = make_schedule(LRConfig(peak=1.0, warmup_epochs=1), epochs=2, steps_per_epoch=4)
    lrs = [lr_at(s) for s in range(8)]
    assert lrs[:4] == pytest.approx([0.125, 0.375, 0.625, 0.875])  # warm-up, first step not wasted at 0
    assert lrs[4:] == pytest.approx([0.875, 0.625, 0.375, 0.125])  # decay, last step not at 0


def test_start_epoch_enters_schedule_partway():
    # ImageNet phase 2 (paper section 5.2): the last 6 epochs of a 28-epoch schedule.
    lr_at = make_schedule(LRConfig(peak=0.05, warmup_epochs=2, schedule_epochs=28, start_epoch=22), epochs=6,
                          steps_per_epoch=10)
    full = lambda e: lr_at_epoch(e, peak=0.05, warmup_epochs=2, total_epochs=28, shape="linear")  # noqa: E731
    assert lr_at(0) == pytest.approx(full(22.05)) and lr_at(59) == pytest.approx(full(27.95))


# --- recipe schema ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "imagenet"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    recipe.check_processes(2)
    assert recipe.mode == "swap" and recipe.phase2 is not None


def test_paper_table5_numbers_in_cifar10_recipe():
    r = load_recipe(RECIPES / "cifar10.yaml")
    assert (r.phase1.global_batch_size, r.phase1.lr.peak, r.phase1.max_epochs, r.phase1.lr.warmup_epochs) == (
        4096, 1.2, 150, 30)
    assert (r.phase1.stop_train_accuracy, r.phase2.per_worker_batch_size, r.phase2.lr.peak, r.phase2.epochs) == (
        0.98, 512, 0.12, 30)
    assert (r.optimizer.momentum, r.optimizer.weight_decay, r.optimizer.nesterov) == (0.9, 5e-4, True)


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "phase1: {global_batch_size: 64, max_epochs: 2, stop_train_accuracy: 0.9, lr: {peak: 0.1}}\n" \
       "phase2: {per_worker_batch_size: 16, epochs: 1, lr: {peak: 0.01}}\n"


@pytest.mark.parametrize("extra, overrides, fragment", [
    ("phase1x: 1\n", [], "phase1x: unknown key"),
    ("model: {nmae: resnet9}\n", [], "did you mean 'model.name'"),
    ("", ["phase1.global_batch_size=abc"], "phase1.global_batch_size"),
    ("", ["phase1.global_batch_size=0"], "greater than 0"),
    ("", ["phase1.stop_train_accuracy=1.5"], "phase1.stop_train_accuracy"),
    ("", ["phase1.stop_train_accuracy=0"], "phase1.stop_train_accuracy"),
    ("", ["phase1.lr.peak=-0.1"], "phase1.lr.peak"),
    ("", ["phase2.epochs=0"], "phase2.epochs"),
    ("", ["phase1.max_epocs=3"], "did you mean 'phase1.max_epochs'"),
    ("", ["phase1.lr.warmup_epochs=5"], "warmup_epochs"),
    ("", ["phase1=3"], "phase1"),
    ("", ["mode=swop"], "mode"),
    ("", ["phase2.workers=0"], "phase2.workers=0 trains no worker; leave it unset for one worker per process"),
    ("", ["phase2.workers=-2"], "phase2.workers=-2 trains no worker"),
])
def test_bad_recipes_name_the_key(tmp_path, extra, overrides, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, BASE + extra), overrides)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_overrides_are_typed(tmp_path):
    r = load_recipe(_write(tmp_path, BASE), ["phase1.max_epochs=7", "model.channels_last=true", "phase1.lr.peak=0.5",
                                              "model.kwargs={base_width: 8}"])
    assert r.phase1.max_epochs == 7 and r.model.channels_last is True and r.phase1.lr.peak == 0.5
    assert r.model.kwargs == {"base_width": 8}


def test_process_count_checks(tmp_path):
    r = load_recipe(_write(tmp_path, BASE))
    r.check_processes(2)
    with pytest.raises(RecipeError, match="not divisible by 3 processes"):
        r.check_processes(3)
    r = load_recipe(_write(tmp_path, BASE), ["phase1.micro_batch_size=5"])
    with pytest.raises(RecipeError, match="micro_batch_size=5"):
        r.check_processes(2)


def test_layout_notes_say_what_one_worker_or_workers_in_turn_mean(tmp_path):
    """A SWAP run whose phase 3 would average a single model, and workers trained in turn, are said in one line each
    (the CLI prints them before training); the paper's layouts and the modes without workers say nothing."""
    r = load_recipe(_write(tmp_path, BASE))
    [one] = r.layout_notes(1)  # a bare `accelerate launch -m swap_accel train`: one process, workers unset
    assert "phase 2 has a single worker (1 process, phase2.workers unset)" in one and "averages one model" in one
    assert "--num_processes N" in one and "phase2.workers=N" in one and "\n" not in one
    assert r.layout_notes(2) == [] and r.layout_notes(8) == []
    [many] = load_recipe(_write(tmp_path, BASE), ["phase2.workers=1000000"]).layout_notes(2)
    assert "phase2.workers=1000000 on 2 process(es): each process trains 500000 workers one after another" in many
    assert "500000 times one worker's time" in many and "\n" not in many
    [group] = load_recipe(_write(tmp_path, BASE), ["phase2.workers=1"]).layout_notes(4)
    assert "single worker (4 processes)" in group and "set phase2.workers to 2 or more" in group
    assert load_recipe(_write(tmp_path, BASE), ["phase2.workers=8"]).layout_notes(8) == []
    for mode in ("swa", "sgd"):
        assert load_recipe(_write(tmp_path, BASE), [f"mode={mode}"]).layout_notes(1) == []


def test_swap_mode_requires_phase2_and_tau(tmp_path):
    with pytest.raises(RecipeError, match="phase2"):
        load_recipe(_write(tmp_path, BASE.splitlines()[0] + "\n"))
    load_recipe(_write(tmp_path, BASE.splitlines()[0] + "\n"), ["mode=sgd"])


# --- model registry ----------------------------------------------------------------------------

def test_resnet9_is_a_timm_model():
    assert "resnet9" in timm.list_models("resnet9*")
    net = timm.create_model("resnet9", num_classes=7, in_chans=1, base_width=8)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    widths = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 16, 16, 32, 64, 64, 64]  # prep, layer1 + residual, layer2, layer3 + residual


def test_resnet9_default_width_matches_dawnbench():
    net = timm.create_model("resnet9")
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == [
        64, 128, 128, 128, 256, 512, 512, 512]
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(net(x), net.fc(net.forward_head(net.forward_features(x), pre_logits=True)) * 0.125)


def test_any_timm_model_and_unknown_names():
    net = build_model("resnet18", in_chans=1, num_classes=10)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ModelError, match="did you mean.*resnet18"):
        check_model_name("resnet81")
    with pytest.raises(ModelError, match="base_widht"):
        build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_widht": 8})


def test_compile_backend_is_checked_by_name_and_compiles_in_place():
    check_compile_backend(True), check_compile_backend(False), check_compile_backend("aot_eager")
    with pytest.raises(ModelError, match="'inductr' is not a torch.compile backend.*inductor"):
        check_compile_backend("inductr")
    net = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 4})
    keys = set(net.state_dict())
    compile_in_place(net, "eager")
    assert net._compiled_call_impl is not None and set(net.state_dict()) == keys


# --- sample orders ----------------------------------------------------------------------------

def test_phase1_shards_partition_each_global_batch():
    shards = [phase1_shard(1000, seed=1, epoch=3, global_batch=96, rank=r, num_processes=3) for r in range(3)]
    assert all(len(s) == 10 * 32 for s in shards)
    union = torch.cat(shards)
    assert union.unique().numel() == union.numel()  # disjoint
    # Step s of rank r is the r-th slice of the s-th block of 96 in the epoch's shared permutation.
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(derive_seed(1, PHASE1, 3)))
    for s in range(10):
        for r in range(3):
            assert torch.equal(shards[r].view(10, 32)[s], perm[96 * s + 32 * r: 96 * s + 32 * (r + 1)])


def test_worker_orders_are_permutations_differing_by_worker_and_epoch():
    a, b = worker_order(500, seed=0, worker=0, epoch=0), worker_order(500, seed=0, worker=1, epoch=0)
    assert torch.equal(a.sort().values, torch.arange(500)) and torch.equal(b.sort().values, torch.arange(500))
    assert not torch.equal(a, b) and not torch.equal(a, worker_order(500, seed=0, worker=0, epoch=1))
    assert torch.equal(a, worker_order(500, seed=0, worker=0, epoch=0))


def test_bn_shards_rebuild_the_same_batches():
    order = bn_order(1000, seed=0, samples=650)
    batches = order.split(100)
    for p in (1, 2, 3):
        rebuilt = [b for r in range(p) for b in bn_shard(order, batch_size=100, rank=r, num_processes=p).split(100)]
        key = lambda t: t.tolist()  # noqa: E731
        assert sorted(map(key, rebuilt)) == sorted(map(key, batches))


def test_constant_shape_keeps_peak_after_warmup():
    lr_at = make_schedule(LRConfig(peak=0.05, warmup_epochs=1, shape="constant"), epochs=3, steps_per_epoch=2)
    assert [lr_at(s) for s in range(6)] == pytest.approx([0.0125, 0.0375, 0.05, 0.05, 0.05, 0.05])


def test_bare_yaml_off_means_off(tmp_path):
    r = load_recipe(_write(tmp_path, BASE + "tracking: {averaged_curve: off}\n"), ["tracking.averaged_curve=2"])
    assert r.tracking.averaged_curve == 2
    assert load_recipe(_write(tmp_path, BASE + "tracking: {averaged_curve: off}\n")).tracking.averaged_curve == "off"


def test_bare_yaml_no_means_no_mixed_precision(tmp_path):
    # YAML 1.1 reads `no` as false: `mixed_precision: no` and `--set mixed_precision=no` must mean "no".
    assert load_recipe(_write(tmp_path, BASE + "mixed_precision: no\n")).mixed_precision == "no"
    recipe = load_recipe(_write(tmp_path, BASE + "mixed_precision: fp16\n"), ["mixed_precision=no"])
    assert recipe.mixed_precision == "no"
    with pytest.raises(RecipeError, match="mixed_precision: Input should be 'auto', 'no', 'bf16' or 'fp16'"):
        load_recipe(_write(tmp_path, BASE), ["mixed_precision=fp8"])


@pytest.mark.parametrize("capability, precision, channels_last", [
    (None, "no", False),  # a CPU: exactly the defaults before `auto`, so CPU runs and their stores are unchanged
    ((7, 0), "no", True),  # V100: bf16 only emulated, fp16 left to the user (it needs loss scaling)
    ((8, 0), "bf16", True),  # A100
    ((9, 0), "bf16", True),  # H100
])
def test_auto_resolves_from_the_training_device_when_the_recipe_loads(tmp_path, monkeypatch, capability, precision,
                                                                       channels_last):
    monkeypatch.setattr(device_defaults, "cuda_capability", lambda: capability)
    notes = []
    recipe = load_recipe(_write(tmp_path, BASE), notes=notes)  # neither key written: their defaults are `auto`
    # On a GPU the run says before it starts what `auto` chose; on a CPU it is the plain fp32 it always was.
    said = (f"note: mixed_precision auto -> {precision}, model.channels_last auto -> true (CUDA compute capability "
            f"{capability[0]}.{capability[1]}; set them to override)") if capability else None
    assert notes == ([said] if said else [])
    assert (recipe.mixed_precision, recipe.model.channels_last) == (precision, channels_last)
    # What a run writes into recipe.yaml is what ran, and reads back as the same recipe on any machine.
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert (dumped["mixed_precision"], dumped["model"]["channels_last"]) == (precision, channels_last)
    # A value the user wrote is kept as written, on any device.
    written = load_recipe(_write(tmp_path, BASE), ["mixed_precision=fp16", f"model.channels_last={not channels_last}"])
    assert (written.mixed_precision, written.model.channels_last) == ("fp16", not channels_last)
    # Resuming that run on a CPU is refused, naming the first setting that would change.
    monkeypatch.setattr(device_defaults, "cuda_capability", lambda: None)
    diff = recipe_difference(load_recipe(_write(tmp_path, BASE)), dumped)
    expected = {"bf16": "mixed_precision: 'bf16' -> 'no'", "no": "model.channels_last: True -> False" if
                channels_last else None}[precision]
    assert diff == expected
    if expected:  # ... with the sets that resume it as it was trained
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(dumped))
        sets = " ".join([*(["--set mixed_precision=bf16"] if precision == "bf16" else []),
                         "--set model.channels_last=true"])
        with pytest.raises(CheckpointError, match=f"other device defaults .*; pass {sets} to resume it"):
            check_run_dir(load_recipe(_write(tmp_path, BASE)), run_dir, 1, overwrite=False)
        check_run_dir(load_recipe(_write(tmp_path, BASE), sets.replace("--set ", "").split()), run_dir, 1,
                      overwrite=False)


@pytest.mark.parametrize("poison", ["weight", "running_var"])
def test_nan_weights_or_bn_statistics_stop_before_a_checkpoint(poison):
    from types import SimpleNamespace

    from swap_accel.algorithm.loop import TrainingDiverged, require_finite

    module = build_model("resnet9", in_chans=1, num_classes=10, kwargs={"base_width": 8})
    ckpt = SimpleNamespace(last_good="p1-step-10")
    require_finite(module, "phase 1 step 11", ckpt)  # finite: passes
    getattr(module.layer1[0][1], poison).data[0] = float("nan")  # a BN layer's weight or running variance
    with pytest.raises(TrainingDiverged, match="p1-step-10"):
        require_finite(module, "phase 1 step 11", ckpt)


def test_fp16_fused_sgd_equals_plain_sgd_through_skipped_first_steps():
    """make_sgd(fp16=True) is fused, so the loss scaler's inf check stays on the device; torch's fused
    SGD leaves its momentum buffers uninitialised when the first step is skipped. The pre-zeroed buffers make
    it bitwise the plain SGD through skipped and applied steps alike."""
    from swap_accel.algorithm.loop import make_sgd
    from swap_accel.parallel.precision import LossScale
    from swap_accel.recipe import OptimizerConfig

    def train(fp16: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        optimizer = make_sgd(model.parameters(), OptimizerConfig(momentum=0.9, nesterov=True, weight_decay=5e-4),
                             0.1, device=torch.device("cpu"), fp16=fp16)
        scale = LossScale(torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2))
        for _ in range(12):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 3, (32,)))
            scale.backward(loss)
            scale.step(optimizer)
            optimizer.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), scale.summary()

    (fused, fused_scale), (plain, plain_scale) = train(True), train(False)
    assert fused_scale == plain_scale and fused_scale["skipped_steps"] >= 2 and fused_scale["growths"] >= 1
    assert torch.isfinite(fused).all() and torch.equal(fused, plain)


def test_sgd_is_fused_for_cuda_and_computes_the_default_sgds_update():
    """Training on CUDA takes the fused SGD (one kernel per step for all parameters; the tuned loop of
    benchmarks/gpu_speed.py uses it); on a CPU torch's default stays, so CPU runs keep their pinned numbers. The
    fused update is the same arithmetic: asked for CUDA while the tensors stay here (torch has a fused CPU kernel
    too), it follows the default SGD through momentum, Nesterov and weight decay within float rounding."""
    from swap_accel.algorithm.loop import make_sgd
    from swap_accel.recipe import OptimizerConfig

    def train(device: str):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
        start = flat()
        optimizer = make_sgd(model.parameters(), OptimizerConfig(momentum=0.9, nesterov=True, weight_decay=5e-4),
                             0.1, device=torch.device(device))
        for _ in range(10):
            torch.nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 3, (32,))).backward()
            optimizer.step()
            optimizer.zero_grad()
        return start, flat(), optimizer.defaults["fused"]

    (start, for_cuda, fused), (_, for_cpu, default) = train("cuda"), train("cpu")
    assert fused is True and not default
    assert (for_cpu - start).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(for_cuda, for_cpu)


def test_a_resumed_optimizer_steps_with_the_kernel_built_for_its_device_not_the_writers(tmp_path):
    """An optimizer.pt written on CUDA says fused; resumed where make_sgd builds torch's default SGD (a CPU in fp32),
    it keeps that default and the momentum it restored, instead of the writer's kernel (load_state_dict would carry
    the flag over)."""
    from swap_accel.algorithm.loop import make_sgd
    from swap_accel.checkpointing.files import save_weights
    from swap_accel.checkpointing.resume import restore_optimizer
    from swap_accel.parallel.precision import LossScale
    from swap_accel.recipe import OptimizerConfig

    torch.manual_seed(0)
    model, opt_cfg = torch.nn.Linear(4, 3), OptimizerConfig(momentum=0.9)
    written = make_sgd(model.parameters(), opt_cfg, 0.1, device=torch.device("cuda"))  # fused, as on a GPU
    model(torch.randn(8, 4)).sum().backward()
    written.step()
    save_weights(tmp_path / "model.safetensors", model)
    torch.save(written.state_dict(), tmp_path / "optimizer.pt")
    resumed = make_sgd(model.parameters(), opt_cfg, 0.1, device=torch.device("cpu"))
    restore_optimizer(tmp_path, model, resumed, LossScale(None))
    assert written.param_groups[0]["fused"] is True
    assert [(g["fused"], g["foreach"]) for g in resumed.param_groups] == [(None, None)]
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["momentum_buffer"], written.state[p]["momentum_buffer"])


def test_cudnn_algorithm_search_stays_off_where_the_process_asked_for_deterministic_kernels():
    """make_accelerator's rule on CUDA (called directly here: the flag is only read by cuDNN): on, unless
    `torch.use_deterministic_algorithms` or `cudnn.deterministic` asked for kernels that pick the same way each run."""
    from swap_accel.parallel.distributed import use_cudnn_benchmark

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    try:
        for algorithms, cudnn_deterministic, expected in [(False, False, True), (True, False, False),
                                                          (False, True, False)]:
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(algorithms)
            torch.backends.cudnn.deterministic = cudnn_deterministic
            assert use_cudnn_benchmark() is expected and torch.backends.cudnn.benchmark is expected
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])


def test_noise_scale_estimates_say_they_exclude_weight_decay_and_are_coupled_through_batchnorm():
    """B_simple here is of the loss gradient alone, measured on BN-coupled batches: every estimate (results.json's
    phase1.noise_scale, transition.json) carries that, so the number is not read as the regularised objective's."""
    from swap_accel.algorithm.noise_scale import estimate

    scope = estimate(1.0, 0.4, 16, 64)["scope"]
    assert "excludes weight decay" in scope and "BatchNorm" in scope and "\n" not in scope
    assert estimate(1.0, 0.1, 16, 64)["scope"] == scope  # also when B_simple itself is undefined
