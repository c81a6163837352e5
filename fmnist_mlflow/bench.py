"""`fmnist bench`: our trainer against the classic loop, fp32 against bf16, tracking overhead, `--jobs` scaling,
and the served network's weight layout.

Every comparison runs its contenders side by side in one process, alternating which goes first in each
round, so that machine drift hits both; ratios are medians over rounds. The classic loop is the one the
report used (pytorch/examples' MNIST shape): a torchvision dataset with per-sample `ToTensor` and
`Normalize`, a shuffling `DataLoader` of batch 64, and the same model, optimizer and image count.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from . import process
from .training import data as data_mod
from .training import hardware, models, train
from .training.config import RunConfig


@dataclass(frozen=True)
class BenchPlan:
    rounds: int
    images: dict  # model -> images per timed pass
    tracked_epochs: int  # epochs of the tracked-vs-untracked model1 runs
    grid_subset: int  # training images per config in the --jobs comparison (one epoch each)
    jobs: int
    tracked_subset: int = 0  # training images of the tracked-vs-untracked runs (0: all 50,000)
    monitor_seconds: float = 20.0  # length of each idle run of the system-metrics CPU comparison
    grid_points: int = 0  # configs of the report's grid in the --jobs comparison (0: all 18)
    serve_images: int = 512  # test images per timed call of the served network in the serving comparison


QUICK = BenchPlan(rounds=3, images={"model1": 10_000, "model3": 4_000}, tracked_epochs=2, grid_subset=2_000, jobs=2)
FULL = BenchPlan(rounds=5, images={"model1": 50_000, "model3": 20_000}, tracked_epochs=10, grid_subset=10_000, jobs=2,
                 monitor_seconds=60.0, serve_images=2048)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{platform.machine()} {hardware.usable_cpus()} of {os.cpu_count()} cores usable, torch {torch.__version__} ({torch.get_num_threads()} threads), {device}"


def _classic_dataset(folder: Path):
    """torchvision's FashionMNIST over our verified files (its own raw/ layout, decompressed)."""
    from torchvision import datasets, transforms

    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    source = data_mod.locate()
    for name in data_mod.FILES:
        (raw / name).write_bytes(data_mod.read_verified(source, name))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((models.PIXEL_MEAN,), (models.PIXEL_STD,))])
    return datasets.FashionMNIST(str(folder), train=True, download=False, transform=transform)


def classic_pass(dataset, model_name: str, images: int, device: str) -> float:
    """Images per second of one pass of pytorch/examples' loop over the first `images` images."""
    subset = torch.utils.data.Subset(dataset, range(images))
    loader = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=True)
    model = models.build(model_name, 0.0).to(device)
    model.norm = torch.nn.Identity()  # the transform has normalised already
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    started = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:  # pytorch/examples logs loss.item() every log_interval (10) batches
            loss.item()
    if device == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - started)


def our_pass(split: data_mod.Split, model_name: str, images: int, device: str, precision: str = "fp32") -> float:
    config = RunConfig(model=model_name, dropout=0.0, device=device, precision=precision)
    part = data_mod.Split(split.x[:images], split.y[:images]).to(device)
    model = train.prepare_model(config)
    optimizer = train.make_optimizer(config, model.parameters())
    generator = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    train.train_epoch(model, optimizer, part, config, generator)  # returns after a device sync
    return images / (time.perf_counter() - started)


def floor_pass(split: data_mod.Split, model_name: str, images: int, device: str, precision: str) -> float:
    """Images per second of the bare step loop: the same model and optimizer on batches sliced beforehand
    (no shuffling, no loss bookkeeping, no callbacks): what the arithmetic alone costs at `precision`."""
    config = RunConfig(model=model_name, dropout=0.0, device=device, precision=precision)
    x = split.x[:images].to(device).contiguous(memory_format=torch.channels_last)
    y = split.y[:images].to(device)
    batches = [(x[i:i + config.batch_size], y[i:i + config.batch_size]) for i in range(0, images, config.batch_size)]
    model = train.prepare_model(config)
    optimizer = train.make_optimizer(config, model.parameters())
    started = time.perf_counter()
    for xb, yb in batches:
        with train.autocast(config):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # one device sync, as train_epoch does
    return images / (time.perf_counter() - started)


def alternate(rounds: int, contenders: dict) -> dict:
    """{name: [result per round]}, the order of the contenders rotating from round to round."""
    names = list(contenders)
    results: dict = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(contenders[name]())
    return results


def throughput(plan: BenchPlan, device: str, report) -> dict:
    dataset = data_mod.load()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        classic = _classic_dataset(Path(tmp))
        for model_name, images in plan.images.items():
            # one untimed pass each: allocator, kernels and caches warm up
            classic_pass(classic, model_name, 640, device), our_pass(dataset.train, model_name, 640, device)
            res = alternate(plan.rounds, {
                "classic": lambda: classic_pass(classic, model_name, images, device),
                "ours": lambda: our_pass(dataset.train, model_name, images, device),
            })
            ratios = [o / c for o, c in zip(res["ours"], res["classic"])]
            out[model_name] = {"classic_img_s": statistics.median(res["classic"]),
                               "ours_img_s": statistics.median(res["ours"]), "speedup": statistics.median(ratios)}
            report(f"{model_name} (fp32 both): classic {out[model_name]['classic_img_s']:,.0f} img/s, ours "
                   f"{out[model_name]['ours_img_s']:,.0f} img/s, speedup {out[model_name]['speedup']:.2f}x")
    return out


def precision(plan: BenchPlan, device: str, report) -> dict:
    """The bare step loop at fp32 and at bf16, and ours at the default precision (what `auto` resolves to
    here), side by side: what bf16 buys, and how close our loop comes to the floor at the same precision."""
    dataset = data_mod.load()
    default = RunConfig(device=device).precision
    has_bf16 = hardware.bf16_units(device)[0] is not False
    out = {"default_precision": default}
    for model_name, images in plan.images.items():
        floor_pass(dataset.train, model_name, 640, device, "fp32"), our_pass(dataset.train, model_name, 640, device, default)
        contenders = {"floor_fp32": lambda: floor_pass(dataset.train, model_name, images, device, "fp32"),
                      "ours_default": lambda: our_pass(dataset.train, model_name, images, device, default)}
        if has_bf16:
            contenders["floor_bf16"] = lambda: floor_pass(dataset.train, model_name, images, device, "bf16")
        res = {name: statistics.median(values) for name, values in alternate(plan.rounds, contenders).items()}
        floor_default = res["floor_bf16"] if default == "bf16" else res["floor_fp32"]
        entry = {f"{name}_img_s": value for name, value in res.items()}
        entry["ours_vs_floor"] = res["ours_default"] / floor_default  # same precision: our loop's cost
        entry["default_vs_fp32_floor"] = res["ours_default"] / res["floor_fp32"]  # what the default gives
        if has_bf16:
            entry["bf16_vs_fp32_floor"] = res["floor_bf16"] / res["floor_fp32"]
        out[model_name] = entry
        bf16 = (f", floor bf16 {res['floor_bf16']:,.0f} img/s ({entry['bf16_vs_fp32_floor']:.2f}x)" if has_bf16
                else ", no bf16 units here")
        report(f"{model_name} precision: floor fp32 {res['floor_fp32']:,.0f} img/s{bf16}; ours at {default} "
               f"{res['ours_default']:,.0f} img/s ({entry['ours_vs_floor']:.2f}x its floor, "
               f"{entry['default_vs_fp32_floor']:.2f}x the fp32 floor)")
    return out


def tracking_overhead(plan: BenchPlan, device: str, report) -> dict:
    """Wall time of a fully tracked run against the same training untracked, on full data."""
    from .tracking.experiment import use_experiment
    from .tracking.fit import tracked_fit

    dataset = data_mod.load(subset=plan.tracked_subset)
    config = RunConfig(model="model1", epochs=plan.tracked_epochs, device=device, subset=plan.tracked_subset)
    with _temp_store() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # artifacts land in the temp dir's ./mlruns
        try:
            use_experiment("bench")

            def timed_tracked(system_metrics: bool):
                with process.environment(system_metrics):
                    return _timed(lambda: tracked_fit(config, dataset))

            timed_tracked(True)  # warm-up: creates the store's tables, imports MLflow's model flavours and psutil
            res = alternate(max(2, plan.rounds - 1), {
                "untracked": lambda: _timed(lambda: train.fit(config, dataset)),
                "tracked": lambda: timed_tracked(True),  # what a run logs by default
                "tracked, no system metrics": lambda: timed_tracked(False),
            })
        finally:
            os.chdir(cwd)
    untracked, tracked = statistics.median(res["untracked"]), statistics.median(res["tracked"])
    bare = statistics.median(res["tracked, no system metrics"])
    fraction, system = (tracked - untracked) / untracked, (tracked - bare) / bare
    report(f"tracking: untracked {untracked:.1f} s, tracked {tracked:.1f} s for {plan.tracked_epochs} epochs of "
           f"model1: overhead {100 * fraction:.1f}% ({tracked - untracked:.2f} s); of which system metrics "
           f"{100 * system:+.1f}% (tracked without them {bare:.1f} s)")
    return {"untracked_s": untracked, "tracked_s": tracked, "overhead": fraction, "epochs": plan.tracked_epochs,
            "tracked_no_system_metrics_s": bare, "system_metrics_overhead": system}


def system_metrics_cpu(plan: BenchPlan, report) -> dict:
    """The CPU time MLflow's system-metrics monitor takes: this process's CPU seconds over an idle run of
    the plan's `monitor_seconds` with the monitor on, against the same run with it off, alternated.
    Wall-clock ratios of whole runs cannot resolve a cost below their few percent of round-to-round noise;
    this can. The share of one core it reports is an upper bound on what it takes from training."""
    import mlflow

    seconds = plan.monitor_seconds

    def idle_run(on: bool) -> float:
        with process.environment(on):
            mlflow.start_run(experiment_id=experiment, log_system_metrics=on)
            before = time.process_time()
            time.sleep(seconds)
            used = time.process_time() - before
            mlflow.end_run()
        return used

    with _temp_store():
        experiment = mlflow.MlflowClient().create_experiment("bench-system-metrics")
        idle_run(True)  # warm-up: the store's tables, psutil
        res = alternate(max(2, plan.rounds - 1), {"on": lambda: idle_run(True), "off": lambda: idle_run(False)})
    on, off = statistics.median(res["on"]), statistics.median(res["off"])
    share = (on - off) / seconds
    report(f"system metrics: the monitor used {1000 * (on - off):.0f} ms of CPU over a {seconds:.0f} s run "
           f"({100 * share:.2f}% of one core; sampling every 10 s)")
    return {"cpu_seconds_on": on, "cpu_seconds_off": off, "seconds": seconds, "core_share": share}


@contextlib.contextmanager
def _temp_store():
    """A throwaway sqlite tracking store for the block (yields its folder); the previous URI after it."""
    import mlflow

    from .tracking import connection

    with tempfile.TemporaryDirectory() as tmp:
        previous = mlflow.get_tracking_uri()
        connection.use_uri(f"sqlite:///{tmp}/mlflow.db")
        try:
            yield tmp
        finally:
            connection.use_uri(previous)


def grid_jobs(plan: BenchPlan, device: str, report) -> dict:
    """Wall time of the report's grid (1 epoch, a subset; its first `grid_points` configs) with --jobs 1 and
    --jobs N, each on a fresh store (nothing to resume)."""
    from .studies import grid as grid_mod
    from .studies import sweep
    from .studies.storage import quiet_optuna
    from .tracking.experiment import use_experiment

    quiet_optuna()
    g = grid_mod.load_grid()
    configs = g.configs(epochs=1, subset=plan.grid_subset, device=device, seeds=(0,))[: plan.grid_points or None]
    dataset = data_mod.load(subset=plan.grid_subset)
    times = {}
    for jobs in (1, plan.jobs, 1, plan.jobs)[: 2 if plan.rounds <= 3 else 4]:
        with _temp_store() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # artifacts land in the temp dir's ./mlruns
            try:
                experiment_id = use_experiment("bench")
                started = time.perf_counter()
                sweep.run_sweep(g, configs, dataset, experiment_id=experiment_id, jobs=jobs,
                                storage_url=f"sqlite:///{tmp}/optuna.db")
                times.setdefault(jobs, []).append(time.perf_counter() - started)
            finally:
                os.chdir(cwd)
    one, many = statistics.median(times[1]), statistics.median(times[plan.jobs])
    report(f"grid ({len(configs)} configs, 1 epoch, {plan.grid_subset:,} images): --jobs 1 {one:.1f} s, --jobs {plan.jobs} "
           f"{many:.1f} s: {one / many:.2f}x")
    return {"jobs_1_s": one, f"jobs_{plan.jobs}_s": many, "jobs_speedup": one / many, "jobs": plan.jobs}


def serving(plan: BenchPlan, report) -> dict:
    """The served network on the CPU (model3 1.5x wide with flip TTA, as the `torch.export` program a logged
    model holds, fp32, untrained weights: the cost does not depend on them), one call on `serve_images` test
    images: its weights as exported (NCHW) against channels_last, as `served_classifier` loads them."""
    from .tracking.logged_models import export  # what `log_model` saves (each call exports a copy)

    x = data_mod.load_test().x[: plan.serve_images].float()
    net = models.FlipTTA(models.build("model3", 0.3, 1.5))
    nchw, channels_last = export(net).module(), export(net).module().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        nchw(x[:64]), channels_last(x[:64])  # untimed: kernels and caches warm up
        res = alternate(plan.rounds, {"nchw": lambda: _timed(lambda: nchw(x)),
                                      "channels_last": lambda: _timed(lambda: channels_last(x))})
    nchw_s, cl_s = statistics.median(res["nchw"]), statistics.median(res["channels_last"])
    out = {"images": len(x), "nchw_ms_per_image": 1000 * nchw_s / len(x),
           "channels_last_ms_per_image": 1000 * cl_s / len(x),
           "speedup": statistics.median(n / c for n, c in zip(res["nchw"], res["channels_last"]))}
    report(f"serving model3 1.5x + flip TTA on the CPU ({len(x)} images a call): NCHW weights "
           f"{out['nchw_ms_per_image']:.2f} ms/image, channels_last {out['channels_last_ms_per_image']:.2f} ms/image, "
           f"speedup {out['speedup']:.2f}x")
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(plan: BenchPlan, device: str, report=print) -> dict:
    report(f"machine: {machine()}; {hardware.describe(device)}; plan: {plan}")
    speed = throughput(plan, device, report)
    prec = precision(plan, device, report)
    overhead = tracking_overhead(plan, device, report)
    monitor = system_metrics_cpu(plan, report)
    jobs = grid_jobs(plan, device, report)
    serve = serving(plan, report)
    return {
        "speedup": speed["model1"]["speedup"], "speedup_model3": speed["model3"]["speedup"],
        "default_precision": prec["default_precision"],
        "bf16_speedup_model3": prec["model3"].get("bf16_vs_fp32_floor"),
        "ours_vs_floor_model3": prec["model3"]["ours_vs_floor"],
        "tracking_overhead": overhead["overhead"], "system_metrics_overhead": overhead["system_metrics_overhead"],
        "system_metrics_core_share": monitor["core_share"],
        "jobs_speedup": jobs["jobs_speedup"], "serving_channels_last_speedup": serve["speedup"],
        "throughput": speed, "precision": prec, "tracking": overhead, "system_metrics": monitor, "grid": jobs,
        "serving": serve,
        "machine": machine(),
        "device": device, "plan": "quick" if plan == QUICK else "full" if plan == FULL else "custom",
    }  # fmt: skip
