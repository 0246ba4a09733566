"""Shared fixtures: configs composed into a temporary folder, tiny image trees, the real CIFAR-10 folder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per worker, subprocesses included
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402
from torchvision.io import write_png  # noqa: E402

import cvarch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# parametrize a test over the devices: the CPU always, CUDA (marked gpu) where present
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def tmp_overrides(tmp_path: Path) -> list[str]:
    """Overrides that keep a run's logs and caches inside ``tmp_path``."""
    return [f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache"]


@pytest.fixture
def compose_tmp(tmp_path):
    """``compose_tmp(*overrides)``: cvarch.compose with logs and caches in the test's tmp folder."""

    def _compose(*overrides: str):
        return cvarch.compose(*tmp_overrides(tmp_path), *overrides)

    return _compose


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Runs a console script of this venv (``cvarch-train``, ``cvarch-eval``); returns a CompletedProcess."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=cwd or ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


CONSOLE_SCRIPTS = {  # console script -> its function in cvarch.cli (pyproject.toml [project.scripts])
    "cvarch-train": "train",
    "cvarch-eval": "evaluate",
    "cvarch-ensemble": "ensemble",
    "cvarch-report": "report",
    "cvarch-profile": "profile",
    "cvarch-compare": "compare",
    "cvarch-bench": "bench",
    "cvarch-compress": "compress",
    "cvarch-lecture": "lecture",
    "python -m cvarch.quadrants": "quadrants",
}


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``run_cli``'s twin in this process: the console script's ``@hydra.main`` with ``sys.argv`` set, its
    output captured and its exit status returned as a CompletedProcess. No interpreter start-up (~7 s on 2
    cores); each tool keeps one real subprocess smoke test. Hydra's global state is reset afterwards."""
    import contextlib
    import importlib
    import io

    from hydra.core.hydra_config import HydraConfig

    main = getattr(importlib.import_module("cvarch.cli"), CONSOLE_SCRIPTS[args[0]])
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, root_handlers = sys.argv, list(logging.getLogger().handlers)
    sys.argv = [args[0], *args[1:]]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:  # Hydra reports a job's exception and exits 1, as the console script does
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
        HydraConfig.instance().cfg = None
        root = logging.getLogger()
        for handler in set(root.handlers) - set(root_handlers):  # Hydra's job logging: the run's log file
            root.removeHandler(handler)
            handler.close()
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def make_image_tree(
    root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, size: int = 12, split: str = "train"
) -> Path:
    """Writes ``root/<split>/<class>/<i>.png``: each class a distinct mean colour plus noise."""
    gen = torch.Generator().manual_seed(0)
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = torch.randint(0, 40, (3, size, size), generator=gen)
            image = (noise + 60 * label).clamp(0, 255).to(torch.uint8)
            write_png(image, str(folder / f"{i:03d}.png"))
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return make_image_tree(tmp_path / "tree")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 image folder (``$CVARCH_DATA_DIR/cifar10``); skips where it is not provided."""
    data_dir = os.environ.get("CVARCH_DATA_DIR")
    if not data_dir:
        pytest.skip("CVARCH_DATA_DIR is not set: no real CIFAR-10 image folder on this machine")
    root = Path(data_dir) / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"CVARCH_DATA_DIR={data_dir} has no cifar10/train folder")
    return root


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> str:
    """``paths.cache_dir=…`` shared by the CIFAR-10 tests of one worker: the decoded folder is cached by its
    fingerprint, so the tests after the first of a split read it instead of decoding the JPEGs again."""
    return f"paths.cache_dir={tmp_path_factory.mktemp('cifar_cache')}"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """One real ``cvarch-train`` run of the default config (what ``make train`` runs), shared by tests."""
    tmp = tmp_path_factory.mktemp("default_run")
    proc = run_cli("cvarch-train", *tmp_overrides(tmp))
    assert proc.returncode == 0, proc.stderr[-4000:]
    output_dir = Path(proc.stdout.strip().splitlines()[-1])
    return {"proc": proc, "output_dir": output_dir, "tmp": tmp}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny trained run, in-process: a one-layer MLP on digits, one epoch, no logger. Its folder holds
    ``config.yaml``, ``metrics.json`` and ``checkpoints/{best,last}.ckpt``; tests copy it before changing
    it."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    cvarch.train(
        cvarch.compose(
            f"hydra.run.dir={run}", f"paths.cache_dir={run.parent}/cache", "logger=none", "model=mlp",
            "model.depth=1", "model.width=16", "trainer.max_epochs=1", "data.train_per_class=3",
        )
    )  # fmt: skip
    return run


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller: its xdist workers inherit the variable
        fd, path = tempfile.mkstemp(prefix="cvarch-figures-", suffix=".txt")
        os.close(fd)
        os.environ["CVARCH_TEST_FIGURES"] = path


CHEAP_SHARED = {"cifar_root", "cifar_cache"}  # shared fixtures that cost nothing to set up twice
SLOW_FIXTURES = {"default_run"}  # a test that uses one of these is slow: `make test-fast` leaves it out


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup``, the tests that share an expensive session- or module-scoped
    fixture (a trained run, a built model) go to one worker, so the fixture is set up once, not once per
    worker; and the slow tests are handed out first."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        info = getattr(item, "_fixtureinfo", None)
        shared = [
            f"{defs[-1].baseid or 'conftest'}::{name}"
            for name, defs in (info.name2fixturedefs.items() if info else ())
            if defs
            and defs[-1].scope in ("session", "module")
            and defs[-1].baseid.startswith("tests")
            and name not in CHEAP_SHARED
        ]
        if shared:
            item.add_marker(pytest.mark.xdist_group(sorted(shared)[0]))
    # the slow tests first (a stable sort): xdist hands out work in this order, so the longest tests start
    # early and the workers finish together instead of one running a long test alone at the end
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def report(line: str) -> None:
    """Records a measured figure; the list is printed when the pytest run ends (from every xdist worker)."""
    with open(os.environ["CVARCH_TEST_FIGURES"], "a") as figures:
        figures.write(line.replace("\n", " ") + "\n")


def pytest_terminal_summary(terminalreporter):
    path = os.environ.get("CVARCH_TEST_FIGURES")
    if os.environ.get("PYTEST_XDIST_WORKER") or not path or not os.path.exists(path):
        return
    lines = Path(path).read_text().splitlines()
    os.unlink(path)
    if lines:
        terminalreporter.section("cvarch measured figures")
        for line in lines:
            terminalreporter.write_line(line)


class _Payload:
    """Unpickling this calls ``open(path, "w")``: the file appears only if the pickle may run code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a checkpoint-shaped pickle; loading it with code allowed makes ``marker``."""
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "payload": _Payload(marker)}, path)
    return path, marker
