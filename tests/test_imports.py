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
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from cvarch import train
        nodes += ast.iter_child_nodes(node)
    return {name for name in names if name.split(".")[0] == "cvarch"}


def module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def cli_modules() -> set[str]:
    """The modules whose ``main`` is a ``@hydra.main`` (cvarch-train, cvarch-eval, …)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and ast.unparse(d.func) == "hydra.main" for d in node.decorator_list
            ):
                found.add(module_name(path))
    return found


def test_no_module_imports_a_cli_module():
    clis = cli_modules()
    assert {"cvarch.train", "cvarch.eval", "cvarch.profile", "cvarch.compare", "cvarch.report",
            "cvarch.bench", "cvarch.quadrants", "cvarch.ensemble"} <= clis  # fmt: skip
    offenders = {
        module_name(path): sorted(imported_modules(path) & clis)
        for path in PACKAGE.rglob("*.py")
        if imported_modules(path) & clis
    }
    assert offenders == {}
