"""Packaging: the configs ship inside the package (``cvarch.conf``), Hydra's search-path plugin gives them to
any app, installed plugins add options, and the sweep plugins are an extra. The slow tests build the wheel and
run its console scripts from a fresh venv outside the repo; the others check that search path in-process."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import cvarch
from cvarch import plugins
from cvarch.config import CONFIG_DIR, CONFIG_MODULE, CONFIG_PATH
from tests.conftest import report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "examples" / "cvarch-example-plugin"
# the sweep extra's Hydra plugins
SWEEP_PLUGINS = ("hydra_joblib_launcher", "hydra_optuna_sweeper", "hydra_submitit_launcher")


# --- the dev install, in-process ----------------------------------------------------------------------------


def _sources() -> list[tuple[str, str]]:
    """``(provider, path)`` of the config search path of the Hydra instance now initialized."""
    return [(s.provider, s.path) for s in GlobalHydra.instance().config_loader().get_sources()]


def test_the_search_path_plugin_gives_any_app_the_train_config_cvarch_composes(tmp_path):
    (tmp_path / "myconf").mkdir()
    with initialize_config_dir(config_dir=str(tmp_path / "myconf"), version_base="1.3"):
        assert ("cvarch", CONFIG_MODULE) in _sources()
        cfg = hydra_compose(config_name="train", overrides=["model=resnet20", "optimizer.lr=0.05"])
    expected = cvarch.compose("model=resnet20", "optimizer.lr=0.05")
    plain, want = (OmegaConf.to_container(c, resolve=False) for c in (cfg, expected))
    for node in (plain, want):  # cvarch.compose sets it as Hydra's run would
        del node["paths"]["output_dir"]
    assert plain == want
    assert plain["model"]["_target_"] == "cvarch.models.resnet.ResNet"


def test_cvarch_apps_read_their_configs_from_the_package_once():
    import hydra_plugins.cvarch_searchpath as searchpath
    from hydra import initialize_config_module

    assert CONFIG_PATH == searchpath.CVARCH_CONFIG_PATH == "pkg://cvarch.conf"
    assert Path(CONFIG_DIR, "train.yaml").is_file()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        paths = [path for _, path in _sources()]
    assert paths.count(CONFIG_MODULE) == 1  # the primary config is not appended again by the plugin


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """An installed distribution ``fake-plugin`` on sys.path: entry points ``fake = fake_plugin`` and one
    broken value, the package ``fake_plugin`` with ``conf/model/fake_net.yaml``."""
    dist = tmp_path / "fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cvarch.plugins]\nfake = fake_plugin\nbroken = not a package\n")
    conf = tmp_path / "fake_plugin" / "conf"
    (conf / "model").mkdir(parents=True)
    (tmp_path / "fake_plugin" / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    (conf / "model" / "fake_net.yaml").write_text(
        "_target_: torch.nn.Flatten  # the plugin's model\nstart_dim: 1  # first dimension flattened\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins._packages.cache_clear()
    yield
    plugins._packages.cache_clear()
    for name in [m for m in sys.modules if m == "fake_plugin" or m.startswith("fake_plugin.")]:
        del sys.modules[name]


def test_installed_plugins_are_found_by_entry_point_and_their_configs_compose(fake_plugin):
    with pytest.warns(UserWarning, match="cvarch plugin 'broken'.*not a package name"):
        assert "fake_plugin" in plugins.plugin_packages()
    assert "fake_plugin.conf" in plugins.plugin_config_modules()
    assert "not a package" not in plugins.plugin_packages()
    cfg = cvarch.compose("model=fake_net")
    assert dict(cfg.model) == {"_target_": "torch.nn.Flatten", "start_dim": 1}


def test_the_search_path_plugin_costs_an_unrelated_hydra_app_no_torch_import(tmp_path):
    """Every Hydra app of an environment with cvarch installed imports its search-path plugin."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 1\n")
    code = (
        "import sys; from hydra import compose, initialize_config_dir\n"
        f"with initialize_config_dir(config_dir={str(tmp_path / 'conf')!r}, version_base='1.3'):\n"
        "    cfg = compose(config_name='config')\n"
        "assert 'hydra_plugins.cvarch_searchpath' in sys.modules and cfg.x == 1\n"
        "print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_cvarch_plugins_imports_only_the_standard_library():
    """Hydra imports it in every app of the environment, through the search-path plugin."""
    tree = ast.parse(Path(plugins.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert {name.split(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {"__future__"}


# --- the wheel, in a fresh venv outside the repository ------------------------------------------------------

# not copied into the build folder: git metadata, the venv, run outputs, data and caches
NOT_SOURCES = {".git", ".venv", "build", "dist", "logs", "data", ".cache", "wandb", "outputs", "multirun"}


def _build_wheel(source: Path, tmp: Path) -> Path:
    """Builds ``source``'s wheel from a copy in ``tmp`` (an in-tree build would write build/ in the repo)."""
    copy = tmp / f"{source.name}-src"
    shutil.copytree(
        source,
        copy,
        ignore=lambda d, names: [
            n
            for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or (Path(d) == source and n in NOT_SOURCES)
        ],
    )
    # the dev venv's setuptools builds it if new enough (pyproject.toml: setuptools>=77), else pip's own
    try:
        isolation = [] if int(version("setuptools").split(".")[0]) < 77 else ["--no-build-isolation"]
    except PackageNotFoundError:
        isolation = []
    out = tmp / f"{source.name}-dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(copy)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def _base_packages(tmp: Path) -> Path:
    """A folder of symlinks to the dev venv's installed packages, except cvarch itself (its dist-info and
    editable finder), the .pth files and the sweep extra's Hydra plugins: what a core ``pip install cvarch``
    gives, without downloading torch again."""
    site = Path(sysconfig.get_paths()["purelib"])
    base = tmp / "base"
    base.mkdir()
    skip = ("cvarch-", "cvarch_", "__editable__", "hydra_plugins", *(f"{p}-" for p in SWEEP_PLUGINS))
    for entry in site.iterdir():
        if not entry.name.startswith(skip) and entry.suffix != ".pth":
            (base / entry.name).symlink_to(entry)
    return base


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """cvarch's wheel installed with pip's dependency resolution into a fresh venv outside the repository, on
    the dev venv's packages as a read-only base (outside the venv's prefix: pip never uninstalls from it)."""
    start = time.perf_counter()
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(ROOT, tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "dev-packages.pth").write_text(f"{_base_packages(tmp)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVARCH_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(HYDRA_FULL_ERROR="1", PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    pip = [python, "-m", "pip", "install", "--no-index", "--quiet"]  # --no-index: nothing may be downloaded
    subprocess.run([*pip, "--dry-run", "--report", str(tmp / "report.json"), wheel], check=True, env=env)
    subprocess.run([*pip, wheel], check=True, env=env)
    work = tmp / "work"  # cwd of every command: runs, caches and outputs land here
    work.mkdir()

    def run(*args: str | Path, cwd: Path = work, timeout: int = 300) -> subprocess.CompletedProcess:
        started = time.perf_counter()
        proc = subprocess.run(
            [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        report(
            f"wheel venv: {Path(str(args[0])).name} {' '.join(map(str, args[1:]))[:70]}: "
            f"{time.perf_counter() - started:.1f} s"
        )
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        return proc

    report(f"wheel venv: wheel built and installed in {time.perf_counter() - start:.1f} s")
    yield SimpleNamespace(
        tmp=tmp, wheel=wheel, venv=venv, site=site, python=python, pip=pip, env=env, work=work, run=run
    )


# one epoch on 10 digits per class: a real run, with checkpoints (debug=fdr writes none), in seconds
TINY_RUN = ("logger=none", "trainer.max_epochs=1", "data.train_per_class=10")


def _last_line(proc: subprocess.CompletedProcess) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_wheel_holds_every_module_every_config_and_the_hydra_plugin(wheel_venv):
    names = set(zipfile.ZipFile(wheel_venv.wheel).namelist())
    assert "cvarch/conf/train.yaml" in names and "cvarch/conf/model/resnet20.yaml" in names
    configs = {
        f"cvarch/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
    }
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "cvarch").rglob("*.py")
        if "_hydra_plugins" not in p.parts
    }
    assert configs | modules <= names
    assert "hydra_plugins/cvarch_searchpath/__init__.py" in names
    assert not any("_hydra_plugins" in name or name.startswith("conf/") for name in names)
    metadata = zipfile.ZipFile(wheel_venv.wheel).read("cvarch-0.1.0.dist-info/METADATA").decode()
    for line in (line for line in metadata.splitlines() if line.startswith("Requires-Dist: hydra-")):
        assert line.startswith("Requires-Dist: hydra-core") or 'extra == "sweep"' in line, line


@pytest.mark.slow
def test_pip_resolves_the_wheels_dependencies_from_the_base_and_installs_only_cvarch(wheel_venv):
    resolved = json.loads((wheel_venv.tmp / "report.json").read_text())
    assert [item["metadata"]["name"] for item in resolved["install"]] == ["cvarch"]
    proc = wheel_venv.run(
        wheel_venv.python,
        "-c",
        "import json, cvarch, cvarch.conf, hydra_plugins.cvarch_searchpath as p; "
        "from cvarch.config import CONFIG_DIR;"
        "cfg = cvarch.compose('model=resnet20');"
        "print(json.dumps([cvarch.__file__, CONFIG_DIR, p.__file__, cfg.model._target_]))",
    )
    cvarch_file, config_dir, plugin_file, target = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(cvarch_file) == wheel_venv.site / "cvarch" / "__init__.py"  # the wheel's copy, not the repo's
    assert Path(config_dir) == wheel_venv.site / "cvarch" / "conf"
    assert Path(plugin_file) == wheel_venv.site / "hydra_plugins" / "cvarch_searchpath" / "__init__.py"
    assert target == "cvarch.models.resnet.ResNet"


@pytest.mark.slow
def test_the_wheels_console_scripts_train_evaluate_and_profile_without_the_sweep_extra(wheel_venv):
    bin_ = wheel_venv.venv / "bin"
    trained = _last_line(wheel_venv.run(bin_ / "cvarch-train", *TINY_RUN))
    assert trained.is_relative_to(wheel_venv.work) and (trained / "config.yaml").is_file()
    metrics = json.loads((trained / "metrics.json").read_text())
    evaluated = _last_line(wheel_venv.run(bin_ / "cvarch-eval", f"ckpt_path={metrics['best_ckpt']}"))
    assert json.loads((evaluated / "metrics.json").read_text())["test/acc"] == pytest.approx(
        metrics["test/acc"]
    )
    proc = wheel_venv.run(
        bin_ / "cvarch-profile",
        "model=vgg16",
        "data.channels=3",
        "data.num_classes=1000",
        "data.image_size=224",
        "measure_memory=false",  # counts only: no forward and backward of VGG-16 at 224×224
    )
    assert "params 138,357,544" in proc.stdout  # Simonyan & Zisserman 2014 Table 2: VGG-16, 138M


@pytest.mark.slow
def test_a_users_own_hydra_app_composes_cvarch_models_beside_its_own_groups(wheel_venv):
    app = wheel_venv.tmp / "userapp"
    (app / "conf" / "scene").mkdir(parents=True)
    (app / "conf" / "config.yaml").write_text(
        textwrap.dedent("""\
        defaults:
          - _self_
          - norm: batchnorm  # cvarch's group: a cvarch model picks its norm through it
          - model: resnet20  # cvarch's group, found through cvarch's search-path plugin
          - scene: indoor    # the app's own group
        data:
          num_classes: 10    # what cvarch's model configs read
          channels: 3
        """)
    )
    (app / "conf" / "scene" / "indoor.yaml").write_text("lights: 3\n")
    (app / "app.py").write_text(
        textwrap.dedent("""\
        import json

        import hydra
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import instantiate

        from cvarch.config import model_parts


        @hydra.main(version_base="1.3", config_path="conf", config_name="config")
        def main(cfg):
            model = instantiate(model_parts(cfg.model)[0])
            sources = [(s.provider, s.path) for s in HydraConfig.get().runtime.config_sources]
            print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                              "lights": cfg.scene.lights, "out": model.fc.out_features, "sources": sources}))


        main()
        """)
    )
    proc = wheel_venv.run(
        wheel_venv.python, app / "app.py", f"hydra.run.dir={wheel_venv.tmp / 'userapp_run'}", cwd=app
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] == pytest.approx(0.27e6, rel=0.02)  # He et al. 2015 Table 6: ResNet-20, 0.27M
    assert result["out"] == 10 and result["lights"] == 3
    assert ["cvarch", "cvarch.conf"] in result["sources"]


@pytest.mark.slow
def test_an_installed_plugin_adds_a_model_that_trains_and_evaluates_without_trust(wheel_venv):
    plugin_wheel = _build_wheel(EXAMPLE_PLUGIN, wheel_venv.tmp)
    subprocess.run([*wheel_venv.pip, plugin_wheel], check=True, env=wheel_venv.env)  # non-editable
    bin_ = wheel_venv.venv / "bin"
    assert "example_net" in wheel_venv.run(bin_ / "cvarch-train", "--help").stdout
    trained = _last_line(wheel_venv.run(bin_ / "cvarch-train", "model=example_net", *TINY_RUN))
    metrics = json.loads((trained / "metrics.json").read_text())
    evaluated = _last_line(wheel_venv.run(bin_ / "cvarch-eval", f"ckpt_path={metrics['best_ckpt']}"))
    result = json.loads((evaluated / "metrics.json").read_text())
    assert result["test/acc"] == pytest.approx(metrics["test/acc"])
    assert result["params"] == 16 * 9 + 2 * 16 + 16 * 32 * 9 + 2 * 32 + 32 * 10 + 10  # digits: 1 channel in
