"""``cvarch-bench [only=[loader,step]]``: how fast cvarch feeds and trains a model, against plain PyTorch.

A developer tool: it measures cvarch itself (the README's Performance section), not a model or a paper, and is
no part of an experiment. ``make bench`` runs it; ``conf/bench.yaml`` lists its keys.

Four figures, each measured in one process with the torch thread count pinned, A and B alternating over
``repeats`` rounds, and reported as the median ratio (airbench and Composer report speed the same way):

1. ``loader``: images/s of cvarch's CIFAR-10 training batches (the in-memory :class:`cvarch.data.BatchLoader`
   + ``augment=cifar`` + the fused ``preprocess=standardize``) against torchvision's per-image PIL pipeline
   (``ImageFolder`` + ``RandomCrop(32, 4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``,
   2 workers), both on the same image-folder tree.
2. ``step``: steady-state training images/s of a ``cvarch-train`` run (``model=resnet20``, batch 128; or the
   experiment ``recipe=`` names, e.g. ``speedrun94``) against a hand-written loop over the same model, data
   tensors, optimizer and augmentation, without Lightning, Hydra or logging. Warm-up steps are excluded.
3. ``epoch``: wall time of one full training epoch plus validation, ``cvarch-train`` against the loop.
4. ``startup``: seconds from launching ``cvarch-train`` to its first training step, and the seconds of that
   spent importing (``python -X importtime``).

The JSON (``out``) holds every repeat, the medians, the targets and whether each was met.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

# the targets, measured on the 2-core CPU development machine
TARGETS = {"loader": 20.0, "step": 0.97, "epoch": 0.95, "startup": 8.0}
FIGURES = tuple(TARGETS)  # what only=[…] may name


class StepTimer(pl.Callback):
    """Records wall-clock times (``time.time()``) of a run's training events into a JSON file.

    ``batches``: the start of every training batch; ``epochs``: ``[start, end]`` of every training epoch
    (its validation and checkpoints included). The file is written at the first batch, so a launcher can read
    the time to the first step while the run goes on, and again when training ends.

    Args:
        path: the JSON file.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.times: dict[str, list] = {"batches": [], "epochs": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self.times["batches"].append(time.time())
        if len(self.times["batches"]) == 1:
            self._write()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.times["epochs"].append([time.time()])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self.times["epochs"][-1].append(time.time())

    def on_train_end(self, trainer, pl_module) -> None:
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.times))


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so a timestamp means the work before it is done (CUDA is
    asynchronous; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(times: Sequence[float], warmup: int, batch_size: int) -> float:
    """Images/s between batch start ``warmup`` and the last batch start (warm-up steps excluded)."""
    steps = len(times) - 1 - warmup
    if steps < 1:
        raise ValueError(f"need more than {warmup + 1} timed batches, got {len(times)}")
    return steps * batch_size / (times[-1] - times[warmup])


def alternate(
    a: Callable[[], float], b: Callable[[], float], repeats: int
) -> tuple[list[float], list[float]]:
    """Runs ``a`` then ``b``, ``repeats`` times, so drifts of the machine hit both alike."""
    results_a, results_b = [], []
    for _ in range(repeats):
        results_a.append(a())
        results_b.append(b())
    return results_a, results_b


def compare(
    name: str, cvarch: list[float], reference: list[float], unit: str, higher_is_better: bool = True
) -> dict[str, Any]:
    """The record of one A/B figure: every repeat, the per-repeat ratios (cvarch ÷ reference for rates,
    reference ÷ cvarch for times, so > 1 always favours cvarch) and their median against the target."""
    ratios = [c / r if higher_is_better else r / c for c, r in zip(cvarch, reference, strict=True)]
    median = statistics.median(ratios)
    return {
        "unit": unit,
        "cvarch": cvarch,
        "reference": reference,
        "ratios": ratios,
        "median_ratio": median,
        "target": TARGETS[name],
        "met": median >= TARGETS[name],
    }


# --- 1. the loader ------------------------------------------------------------------------------------------
def torchvision_loader_rate(
    root: Path, batch_size: int, batches: int, workers: int, device: torch.device
) -> float:
    """Images/s of the standard per-image PIL pipeline, first batch (worker start-up) excluded; batches are
    copied to ``device`` (pinned, asynchronously) as a training loop would."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    gpu = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=gpu)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(iterator)
        x.to(device, non_blocking=gpu)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del iterator
    return batches * batch_size / elapsed


def cvarch_loader_rate(raw: RawLoop, batches: int) -> float:
    """Images/s of cvarch's training batches on the device, augmented and normalized (ready for the model)."""
    from cvarch.data import BatchLoader, Split

    images, targets = raw.splits["train"]
    loader = BatchLoader(Split(images, targets), raw.batch_size, raw.datamodule.train_dataloader().sampler)
    count, start = 0, time.perf_counter()
    while count < batches:
        for x, y in loader:
            x, y = raw.augment(x, y)
            x = raw.preprocess(x)
            count += 1
            if count == batches:
                break
    synchronize(raw.device)
    return batches * raw.batch_size / (time.perf_counter() - start)


# --- 2 and 3. cvarch-train against a hand-written loop ------------------------------------------------------
def run_overrides(
    root: Path, num_classes: int, out: Path, extra: Sequence[str] = (), experiment: str | None = None
) -> list[str]:
    """The ``cvarch-train`` overrides every benchmark run shares: ResNet-20, batch 128, CIFAR augmentation
    (or the recipe of ``experiment``, e.g. ``speedrun94``), the image folder at ``root``, logs in ``out``, and
    the :class:`StepTimer` callback."""
    recipe = (
        [f"experiment={experiment}"]
        if experiment
        else ["model=resnet20", "data=imagefolder", "data.batch_size=128", "augment=cifar", "scheduler=none"]
    )
    return [
        *recipe,
        f"data.root={root}",
        f"data.num_classes={num_classes}",
        "preprocess=standardize",
        f"paths.log_dir={out}/logs",
        f"threads={torch.get_num_threads()}",
        "+callbacks.bench_timer._target_=cvarch.bench.StepTimer",
        f"+callbacks.bench_timer.path={out}/times.json",
        *extra,
    ]


def cvarch_run(overrides: Sequence[str], out: Path) -> dict[str, list]:
    """Runs ``cvarch.train`` in this process and returns the :class:`StepTimer` times."""
    import cvarch

    times = out / "times.json"
    times.unlink(missing_ok=True)
    cvarch.train(cvarch.compose(*overrides))
    return json.loads(times.read_text())


class RawLoop:
    """The hand-written baseline: the same model, data tensors, SGD, augmentation and preprocess as a
    ``cvarch-train`` run, in a plain PyTorch loop (no Lightning, no Hydra, no logging).

    Args:
        overrides: the run's overrides, composed once to build the same objects.
        device: where the data, model and augmentation live (the cvarch run's accelerator).
    """

    def __init__(self, overrides: Sequence[str], device: torch.device) -> None:
        import cvarch
        from cvarch.build import build_inputs

        cfg = cvarch.compose(*overrides)
        self.cfg = cfg
        self.datamodule, self.preprocess, self.augment = build_inputs(cfg)  # as cvarch-train builds them
        self.device = device
        self.augment.fit(self.datamodule.train_images)  # what the LightningModule's setup does
        self.preprocess.to(device)
        self.augment.to(device)
        self.shape = self.augment.output_shape(self.datamodule.image_shape)
        self.batch_size = cfg.data.batch_size
        self.splits = {  # uint8 on the device, as cvarch holds them
            name: (split.images.to(device), split.targets.to(device))
            for name, split in self.datamodule.splits.items()
        }

    def fresh(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """A newly initialized model and its optimizer (the config's SGD: lr, momentum, weight decay)."""
        from cvarch.build import build_model, init_batch

        torch.manual_seed(self.cfg.seed)
        batch = init_batch(self.cfg, self.datamodule, self.preprocess.cpu(), self.shape)  # data-driven inits
        self.preprocess.to(self.device)
        model = build_model(self.cfg, image_shape=self.shape, batch=batch).to(self.device)
        opt = self.cfg.optimizer
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=opt.lr,
            momentum=opt.get("momentum", 0.0),
            weight_decay=opt.get("weight_decay", 0.0),
            nesterov=opt.get("nesterov", False),
        )
        return model, optimizer

    def train_epoch(self, model, optimizer, steps: int | None = None, epoch: int = 0) -> list[float]:
        """One epoch (or its first ``steps`` batches) of SGD; returns each batch's start time."""
        images, targets = self.splits["train"]
        self.augment.set_epoch(epoch)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(epoch)).to(self.device)
        model.train()
        times = []
        for index in order.split(self.batch_size)[:steps]:
            synchronize(self.device)
            times.append(time.time())
            x, y = self.augment(images[index], targets[index])
            loss = F.cross_entropy(
                model(self.preprocess(x)), y, label_smoothing=self.cfg.loss.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return times

    @torch.no_grad()
    def validate(self, model) -> float:
        """Accuracy on the validation split (0 without one: ``data.val_fraction=0``)."""
        model.eval()
        images, targets = self.splits["val"]
        if not len(targets):
            return 0.0
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in zip(images.split(self.batch_size), targets.split(self.batch_size), strict=True):
            correct += (model(self.preprocess(x)).argmax(1) == y).sum()
        return int(correct) / len(targets)

    def epoch_seconds(self, out: Path) -> float:
        """Wall time of one training epoch, the validation pass and a checkpoint (model + optimizer)."""
        model, optimizer = self.fresh()
        start = time.time()
        self.train_epoch(model, optimizer)
        self.validate(model)  # int(correct): waits for the device
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "raw.ckpt")
        return time.time() - start


# --- 4. start-up --------------------------------------------------------------------------------------------
def startup_seconds(overrides: Sequence[str], out: Path) -> float:
    """Seconds from launching ``cvarch-train`` (a fresh process) to the start of its first training batch."""
    times = out / "times.json"
    times.unlink(missing_ok=True)
    start = time.time()
    command = [sys.executable, "-m", "cvarch.train", *overrides]
    subprocess.run(command, check=True, capture_output=True, env=_child_env())
    return json.loads(times.read_text())["batches"][0] - start


def import_seconds(overrides: Sequence[str]) -> tuple[float, list[tuple[str, float]]]:
    """Seconds a ``cvarch-train`` start spends importing (``-X importtime``, top-level imports summed), and
    the five slowest top-level imports."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cvarch.train", *overrides],
        check=True,
        capture_output=True,
        text=True,
        env=_child_env(),
    )
    top = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if not name.startswith("  "):  # one space after the bar: a top-level import
            top.append((name.strip(), int(cumulative) / 1e6))
    return sum(s for _, s in top), sorted(top, key=lambda t: -t[1])[:5]


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HYDRA_FULL_ERROR": "1"}


# --- the harness --------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
    }


def measure(cfg: DictConfig) -> dict[str, Any]:
    """Measures the figures named in ``cfg.only`` and returns the JSON record.

    Args:
        cfg: the ``bench`` root config (conf/bench.yaml).

    Raises:
        ValueError: naming ``only`` when it names an unknown figure.
        FileNotFoundError: naming ``root`` when it has no ``train/`` folder.
    """
    unknown = sorted(set(cfg.only) - set(FIGURES))
    if unknown:
        raise ValueError(f"only: unknown figures {unknown}; expected some of {list(FIGURES)}")
    torch.set_num_threads(cfg.threads or os.cpu_count())
    root = Path(cfg.root).expanduser()
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"root: {root} has no train/ folder (an image-folder tree, e.g. CIFAR-10's)")
    num_classes = sum(1 for d in (root / "train").iterdir() if d.is_dir())
    quick = cfg.quick
    repeats, epoch_repeats = (1, 1) if quick else (cfg.repeats, cfg.epoch_repeats)
    out = Path(cfg.workdir or tempfile.mkdtemp(prefix="cvarch-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    extra = [f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    extra += [f"paths.cache_dir={cfg.cache_dir}"] if cfg.cache_dir else []
    if quick:  # a few steps each: checks the harness, not the speed
        extra.append("data.batch_size=8")
    train_overrides = list(cfg.train_overrides)
    experiment = cfg.get("recipe")  # not "experiment": that name is cvarch-train's config group
    raw = RawLoop(run_overrides(root, num_classes, out, extra, experiment), device)
    base = run_overrides(root, num_classes, out, [*extra, *train_overrides], experiment)  # cvarch's runs only
    results: dict[str, Any] = {
        "machine": machine(),
        "device": str(device),
        "root": str(root),
        "quick": quick,
        "repeats": repeats,
        "overrides": train_overrides,
        "experiment": experiment,
    }
    batch = raw.batch_size
    warmup, steps = (1, 3) if quick else (cfg.warmup, cfg.steps)
    only = set(cfg.only)

    if "loader" in only:
        batches = 4 if quick else cfg.loader_batches
        results["loader"] = compare(
            "loader",
            *alternate(
                lambda: cvarch_loader_rate(raw, batches * 5),
                lambda: torchvision_loader_rate(root, batch, batches, cfg.workers, device),
                repeats,
            ),
            unit="images/s",
        )
        results["loader"]["workers"] = cfg.workers

    if "step" in only:
        limits = [
            f"++trainer.max_steps={warmup + steps}",
            "++trainer.limit_val_batches=1",
            "++trainer.limit_test_batches=1",
        ]

        def cvarch_step() -> float:
            return rate(cvarch_run([*base, *limits], out)["batches"], warmup, batch)

        def raw_step() -> float:
            model, optimizer = raw.fresh()
            return rate(raw.train_epoch(model, optimizer, steps=warmup + steps + 1), warmup, batch)

        results["step"] = compare("step", *alternate(cvarch_step, raw_step, repeats), unit="images/s")
        model = f"experiment={experiment}" if experiment else "resnet20"
        results["step"].update(warmup_steps=warmup, timed_steps=steps, batch_size=batch, model=model)

    if "epoch" in only:
        epoch = ["trainer.max_epochs=1", "++trainer.max_steps=-1", "++trainer.limit_test_batches=1"]

        def cvarch_epoch() -> float:
            start, end = cvarch_run([*base, *epoch], out)["epochs"][0]
            return end - start

        results["epoch"] = compare(
            "epoch",
            *alternate(cvarch_epoch, lambda: raw.epoch_seconds(out), epoch_repeats),
            unit="s",
            higher_is_better=False,
        )
        results["epoch"]["train_images"] = len(raw.datamodule.splits["train"])
        results["epoch"]["val_images"] = len(raw.datamodule.splits["val"])

    if "startup" in only:
        first = [
            *base,
            "++trainer.max_steps=1",
            "++trainer.limit_val_batches=1",
            "++trainer.limit_test_batches=1",
        ]
        seconds = [startup_seconds(first, out) for _ in range(repeats)]
        imports, slowest = import_seconds(first)
        median = statistics.median(seconds)
        results["startup"] = {
            "unit": "s",
            "seconds": seconds,
            "median": median,
            "imports_s": imports,
            "slowest_imports": slowest,
            "target": TARGETS["startup"],
            "met": median < TARGETS["startup"],
        }
    return results


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table (what the README's Performance section shows)."""
    rows = ["| figure | cvarch | reference | median ratio | target | met |", "|---|---|---|---|---|---|"]
    for name in ("loader", "step", "epoch"):
        if name in results:
            r = results[name]
            rows.append(
                f"| {name} ({r['unit']}) | {statistics.median(r['cvarch']):,.1f} | "
                f"{statistics.median(r['reference']):,.1f} | {r['median_ratio']:.3f} | ≥ {r['target']} | "
                f"{'yes' if r['met'] else 'no'} |"
            )
    if "startup" in results:
        r = results["startup"]
        rows.append(
            f"| start-up to first step (s) | {r['median']:.2f} (imports {r['imports_s']:.2f}) | – | – | "
            f"< {r['target']} | {'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """``cvarch-bench`` as a function: measures (:func:`measure`), writes the JSON to ``cfg.out``, prints the
    table and the machine, and returns the record.

    Args:
        cfg: the ``bench`` root config (``@hydra.main`` or ``cvarch.compose(..., config_name="bench")``).
    """
    results = measure(cfg)
    Path(cfg.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['threads']} threads; JSON: {cfg.out}"
    )
    return results


def cli(cfg: DictConfig) -> None:
    """``cvarch-bench [quick=true] [only=[loader,step,epoch,startup]] [out=bench.json]``, a developer tool."""
    # The benchmark composes its cvarch-train runs with cvarch.compose, which initializes Hydra itself; Hydra
    # allows one initialization per process, and this app's is not needed once its own config is composed.
    GlobalHydra.instance().clear()
    run(cfg)


if __name__ == "__main__":  # python -m cvarch.bench, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import bench

    bench()
