"""What importing cvarch costs, and which way its modules point (STYLE.md "Layers point one way"): a model
file imports torch and nothing of Lightning, Hydra or plotting, and no module imports a CLI module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "cvarch"
# what a model must not cost its importer: a training framework, a config system, plotting, a data stack
HEAVY = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "hydra",
    "omegaconf",
    "sklearn",
    "matplotlib",
    "wandb",
)


def test_importing_cvarch_and_its_models_loads_no_framework():
    """One fresh interpreter (import state is per process); each import is checked before the next one."""
    script = f"""
import importlib, json, pkgutil, sys
loaded = {{}}
def check(name):
    importlib.import_module(name)
    loaded[name] = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
check("cvarch")
check("cvarch.models")
check("cvarch.models.resnet")
for info in pkgutil.iter_modules(sys.modules["cvarch.models"].__path__):
    check("cvarch.models." + info.name)
check("cvarch.cost")
print(json.dumps(loaded))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout)
    assert len(loaded) > 10  # every model family was imported
    assert {name: heavy for name, heavy in loaded.items() if heavy} == {}


def test_the_lazy_api_gives_the_functions():
    """``cvarch.train`` stays the function even once the submodule of that name is imported."""
    import cvarch
    import cvarch.train
    from cvarch.config import compose
    from cvarch.train import train

    assert cvarch.train is train and cvarch.compose is compose
    assert set(cvarch.__all__) == {"__version__", "build_model", "compose", "train"}


def imported_modules(path) -> set[str]:
    """Every cvarch module that the file at ``path`` imports when it runs, at the top or inside a function
    (``if TYPE_CHECKING:`` blocks are for type checkers only)."""
    names = set()
    nodes = [ast.parse(path.read_text(), filename=str(path))]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            nodes += node.orelse
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue  # run as a script (python -m cvarch.train), the module is a console entry point itself
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from cvarch import train
        nodes += ast.iter_child_nodes(node)
    return {name for name in names if name.split(".")[0] == "cvarch"}


def module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


CLI_MODULES = {"cvarch.cli"}  # the console scripts' @hydra.main wrappers


def hydra_mains() -> set[str]:
    """The modules that define a ``@hydra.main`` (decorator or call)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "hydra.main":
                found.add(module_name(path))
    return found


def test_the_console_scripts_are_the_thin_wrappers_of_cvarch_cli():
    """One way in: every console script is a cvarch.cli function, and only cvarch.cli calls hydra.main."""
    import tomllib

    import cvarch.cli
    from cvarch.config import CONFIG_PATH

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {target.split(":")[0] for target in scripts.values()} == {"cvarch.cli"}
    assert all(callable(getattr(cvarch.cli, t.split(":")[1])) for t in scripts.values())
    assert hydra_mains() == {"cvarch.cli"} and cvarch.cli.CONFIG_PATH == CONFIG_PATH


def test_no_module_imports_a_cli_module():
    offenders = {
        module_name(path): sorted(imported_modules(path) & CLI_MODULES)
        for path in PACKAGE.rglob("*.py")
        if imported_modules(path) & CLI_MODULES and module_name(path) not in CLI_MODULES
    }
    assert offenders == {}


def test_the_console_scripts_start_without_torch():
    """Hydra answers --help and tab completion before the job runs: neither may cost torch (~5 s a TAB)."""
    script = "import sys,cvarch.cli; print(sorted({n.split('.')[0] for n in sys.modules}&{'torch','hydra'}))"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['hydra']"
