"""Composing and checking configs: the Python route to exactly the config the CLI builds."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

# The configs ship inside the package as cvarch.conf (pyproject.toml maps it to the repository's conf/
# folder), so an installed wheel finds them as an editable install does.
CONFIG_MODULE = "cvarch.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # config_path of every console script's @hydra.main
CONFIG_DIR = str(files(CONFIG_MODULE))  # the same folder on disk, for code and tests that list its YAML files


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted key."""


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """Returns the config ``cvarch-train <overrides>`` would build, with the run directory filled in.

    Args:
        *overrides: Hydra overrides, e.g. ``"model=resnet20"``, ``"optimizer.lr=0.05"``.
        config_name: root config (``train`` or ``eval``).
    """
    with initialize_config_module(CONFIG_MODULE, version_base="1.3", job_name=f"cvarch_{config_name}"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    # Hydra sets runtime.output_dir when it runs a job; do what it would do, then drop the hydra node as the
    # CLI's job config does. The output dir is resolved now so later compose() calls cannot change it.
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).absolute())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.output_dir = cfg.hydra.runtime.output_dir
        del cfg["hydra"]
    return cfg


def compose_nested(*overrides: str, config_name: str = "train") -> DictConfig:
    """:func:`compose` for a tool that builds other models of the zoo beside its own (``cvarch-compare``'s
    models, ``cvarch-compress``'s reference): inside a console script, whose ``@hydra.main`` has already
    initialized Hydra on the same conf/ folder and refuses a second initialization, that instance composes
    (without a run directory).

    Args:
        *overrides: Hydra overrides, e.g. ``"model=alexnet"``.
        config_name: root config.
    """
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    return compose(*overrides, config_name=config_name)


@contextlib.contextmanager
def plain_config_errors(tool: str) -> Iterator[None]:
    """Around a console script's work: a config error of a single run ends it with ``<tool>: <message>`` on
    stderr and exit status 1, not Hydra's traceback; ``HYDRA_FULL_ERROR=1`` keeps the traceback. In a multirun
    the error stays an exception, which Hydra records as that job's failure while the other jobs run."""
    try:
        yield
    except ConfigError as err:
        from hydra.types import RunMode

        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode != RunMode.RUN:
            raise
        print(f"{tool}: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def split_off(node: Mapping[str, Any] | None, key: str) -> tuple[dict | None, dict]:
    """Splits a group's node into its ``_target_`` config and the sub-key ``key``, which is not a constructor
    argument: ``lightning`` of the ``scheduler`` group (``monitor``, ``interval``, ``frequency``) and
    ``groups`` of the ``optimizer`` group (``decay_norm_bias``, ``lr_mult``, ``norm_bias_lr_mult``: see
    :func:`cvarch.optimizer.param_groups`). An empty or missing node gives ``(None, {})``."""
    if not node:
        return None, {}
    node = dict(node)
    extra = dict(node.pop(key, None) or {})
    return node, extra


def scheduler_parts(scheduler: Mapping[str, Any] | None) -> tuple[dict | None, dict]:
    """The scheduler group's ``torch.optim.lr_scheduler`` partial config and its ``lightning`` keys."""
    return split_off(scheduler, "lightning")


def optimizer_parts(optimizer: Mapping[str, Any] | None) -> tuple[dict | None, dict]:
    """The ``torch.optim`` partial config and the ``groups`` keys of the optimizer group."""
    return split_off(optimizer, "groups")


MODEL_OPTIONS = ("channels_last", "compile")  # how the model runs, not what it is: no constructor takes them


def model_parts(model: Mapping[str, Any]) -> tuple[dict, dict[str, bool]]:
    """The model constructor's config and the model group's fast-path options (``channels_last``,
    ``compile``: see :func:`cvarch.build.build_model`). Configs saved by cvarch versions before the options
    lack them: ``False``."""
    node = dict(model)
    options = {key: node.pop(key, False) for key in MODEL_OPTIONS}
    return node, options


def validate(cfg: DictConfig) -> None:
    """Checks every ``_target_`` node's keys and value types against the target's signature, before any work.

    Only clear mismatches are errors: an unknown key where the target takes no ``**kwargs``, or a value whose
    type cannot match the annotation (``optimizer.lr=abc`` against ``lr: float``). Unknown annotations pass.

    Raises:
        ConfigError: listing every offending dotted key.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    errors: list[str] = []
    if not isinstance(plain.get("seed", 0), int) or isinstance(plain.get("seed"), bool):
        errors.append(f"seed: expected an integer, got {plain['seed']!r}")
    errors += _out_of_range(plain)
    if "scheduler" in plain:
        plain["scheduler"], lightning = scheduler_parts(plain["scheduler"])
        if plain["scheduler"] is not None and lightning.get("interval", "epoch") not in ("epoch", "step"):
            errors.append(
                f"scheduler.lightning.interval: expected 'epoch' or 'step', got {lightning['interval']!r}"
            )
    if "optimizer" in plain:
        plain["optimizer"], groups = optimizer_parts(plain["optimizer"])
        unknown = sorted(set(groups) - {"decay_norm_bias", "lr_mult", "norm_bias_lr_mult"})
        if unknown:
            errors.append(
                f"optimizer.groups: unknown keys {unknown}; expected decay_norm_bias, lr_mult, "
                "norm_bias_lr_mult"
            )
    lr = (plain.get("optimizer") or {}).get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not lr > 0:
        errors.append(f"optimizer.lr: the learning rate must be > 0, got {lr}")
    for key, value in (plain.get("model") or {}).items():
        is_rate = str(key).startswith(("dropout", "drop_path"))
        if is_rate and isinstance(value, (int, float)) and not 0 <= value < 1:
            errors.append(f"model.{key}: a drop probability must be in [0, 1), got {value}")
    if "model" in plain:
        plain["model"], options = model_parts(plain["model"])
        errors += [
            f"model.{k}: expected a boolean, got {v!r}" for k, v in options.items() if not isinstance(v, bool)
        ]
    _check(plain, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _out_of_range(plain: dict[str, Any]) -> list[str]:
    """Values of the right type that cannot work: a negative seed, a run that trains nothing or never stops,
    zero threads, a one-class classifier, Adam's betas not a pair in [0, 1)."""
    errors = []
    seed = plain.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:
        errors.append(f"seed: must be in [0, 2**32 - 1] (what NumPy's generator takes), got {seed}")
    trainer = plain.get("trainer") or {}
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if epochs == 0 or steps == 0:
        key = "trainer.max_epochs" if epochs == 0 else "trainer.max_steps"
        errors.append(f"{key}: 0 trains nothing; a model is evaluated with cvarch-eval")
    elif epochs == -1 and (steps is None or steps == -1):
        errors.append("trainer.max_epochs: -1 without trainer.max_steps trains forever; set one of them")
    threads = plain.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        errors.append(
            f"threads: a positive number of torch threads, or null for the default, got {threads!r}"
        )
    size = (plain.get("data") or {}).get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        errors.append(f"data.image_size: a side in pixels (>= 1), or null for the native size; got {size!r}")
    num_classes = (plain.get("data") or {}).get("num_classes")
    if _number(num_classes) and num_classes < 2:
        errors.append(f"data.num_classes: a classifier needs at least 2 classes, got {num_classes}")
    betas = (plain.get("optimizer") or {}).get("betas")
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        errors.append(f"optimizer.betas: two numbers in [0, 1) (Adam's β1, β2), got {betas!r}")
    return errors


def _check(node: Any, path: str, errors: list[str]) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check(item, f"{path}[{i}]", errors)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("_target_"), str):
        _check_call(node, path, errors)
    for key, value in node.items():
        if not str(key).startswith("_"):
            _check(value, f"{path}.{key}" if path else str(key), errors)


# --- the trust boundary -------------------------------------------------------------------------------------
# What the user runs (command line, their config files, their Python) is trusted, as in any Hydra app: a
# config is code. What they received (a checkpoint's saved config, a run folder's config.yaml, a transfer
# source) is data: from it cvarch builds only the exact targets of its own packaged configs (and of installed
# cvarch plugins), plus those of the packages the user names with ``trust=[pkg]`` on the command line.
# Matching is on exact names, not on a prefix such as ``torch.``: torch has callables that load or run code
# (``torch.hub.load``, ``torch.load``, ``torch.jit.load``, ``torch._inductor.codecache.PyCodeCache.load``,
# ``torch.utils.cpp_extension.load_inline``).


def _yaml_files(root: Any) -> Iterator[Any]:
    """The ``.yaml`` files under an ``importlib.resources`` traversable, recursively."""
    for entry in root.iterdir():
        if entry.is_dir():
            yield from _yaml_files(entry)
        elif entry.name.endswith(".yaml"):
            yield entry


# targets that earlier cvarch configs built and that run configs saved in older checkpoints still hold
RETIRED_TARGETS = frozenset({"cvarch.init.apply_init"})  # init's one target before one class per scheme


@functools.cache
def packaged_targets() -> frozenset[str]:
    """The exact ``_target_`` names that the packaged configs of cvarch and its installed plugins build."""
    from importlib.resources import files

    import yaml

    from cvarch.plugins import plugin_config_modules

    roots: list[Any] = [Path(CONFIG_DIR)]
    for module in plugin_config_modules():
        try:
            roots.append(files(module))
        except (ModuleNotFoundError, TypeError):  # a plugin without configs
            continue
    targets: set[str] = set()
    for root in roots:
        for path in _yaml_files(root):
            tree = yaml.safe_load(path.read_text())
            targets.update(t for _, t in _target_keys(tree, "") if isinstance(t, str))
    return frozenset(targets | RETIRED_TARGETS)


@functools.cache
def torch_classes() -> frozenset[str]:
    """The explicit module sets a received config may also build: torch's layer classes (``torch.nn.<Layer>``,
    from ``torch.nn.modules.__all__``: a plain ``torch.nn.Sequential`` model), optimizers (``torch.optim``)
    and lr schedulers (``torch.optim.lr_scheduler``): constructors that only allocate, no loader."""
    import torch.nn.modules
    import torch.optim.lr_scheduler

    sets = {
        "torch.nn": torch.nn.modules,
        "torch.optim": torch.optim,
        "torch.optim.lr_scheduler": torch.optim.lr_scheduler,
    }
    return frozenset(
        f"{prefix}.{name}"
        for prefix, module in sets.items()
        for name in module.__all__
        if inspect.isclass(getattr(module, name))
    )


def trusted_packages(trust: Sequence[str] | None = ()) -> tuple[str, ...]:
    """The packages whose objects a received file may build: those the user named in ``trust`` and the
    installed cvarch plugins' packages.

    Raises:
        ConfigError: naming ``trust`` when an entry is not a dotted package name.
    """
    from cvarch.plugins import PACKAGE_NAME, plugin_packages

    if isinstance(trust, str):
        trust = [trust]
    named = [str(t) for t in (trust or [])]
    wrong = [t for t in named if not PACKAGE_NAME.fullmatch(t)]
    if wrong:
        raise ConfigError(f"trust: {wrong} are not package names; expected e.g. trust=[mylab]")
    return tuple(dict.fromkeys([*named, *plugin_packages()]))


def _in_packages(name: str, packages: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def received_target_error(target: Any, where: str, source: str, packages: Sequence[str]) -> str | None:
    """Why a received file may not build ``target``, or ``None``. A target of a trusted package must also
    resolve to an object defined in one (an alias such as ``mylab.os.system`` is refused); an exact packaged
    target is never imported here; see :func:`torch_classes` for the torch classes."""
    if isinstance(target, str) and (target in packaged_targets() or target in torch_classes()):
        return None
    top = str(target).split(".")[0]
    refusal = (
        f"{source}: {where}: {target!r} is not allowed. A received file "
        "(checkpoint, run folder, transfer source) "
        "is data: cvarch builds from it only the targets of its own configs and installed cvarch plugins"
    )
    if not isinstance(target, str) or not _in_packages(target, packages):
        return f"{refusal}. If you trust the package {top!r}, name it on the command line: trust=[{top}]"
    try:
        obj = get_object(target)
    except Exception as err:
        return f"{source}: {where}: cannot import {target!r} ({err})"
    module = getattr(obj, "__module__", None) or ""
    if isinstance(obj, types.ModuleType) or not _in_packages(module, packages):
        return (
            f"{refusal}; {target!r} is an alias of {module or type(obj).__name__}."
            f"{getattr(obj, '__name__', '')}, outside the trusted packages {list(packages)}"
        )
    return None


def check_received(node: Any, source: str, trust: Sequence[str] | None = ()) -> None:
    """Refuses a received config (a checkpoint's saved config, a run folder's ``config.yaml``, a transfer
    source's config) if any ``_target_`` in it, anywhere (``hydra.callbacks`` included), is outside
    :func:`packaged_targets` and the ``trust`` packages. Nothing is imported or called before the whole tree
    passes. A ``trust`` key inside the received config is ignored: only the live invocation's counts.

    Args:
        node: the received config (DictConfig, dict or list).
        source: what it came from, for the message (``ckpt_path: <file>``).
        trust: the live invocation's ``trust`` list.

    Raises:
        ConfigError: naming the source, the dotted key and the target, and how to trust its package.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    packages = trusted_packages(trust)
    for where, target in _target_keys(node, ""):
        error = received_target_error(target, where, source, packages)
        if error:
            raise ConfigError(error)


def _target_keys(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, target)`` of every ``_target_`` in a plain config tree."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _target_keys(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield dotted, value
            else:
                yield from _target_keys(value, dotted)


def _check_call(node: dict, path: str, errors: list[str]) -> None:
    target = node["_target_"]
    try:  # the live config is trusted: its targets are imported, then checked against their signatures
        obj = get_object(target)
    except Exception as err:
        errors.append(f"{path}._target_: cannot import {target!r} ({err})" if path else f"_target_: {err}")
        return
    params, hints, takes_kwargs = _signature(obj)
    if params is None:
        return
    for key, value in node.items():
        key = str(key)
        if key.startswith("_"):
            continue
        dotted = f"{path}.{key}" if path else key
        if key not in params:
            if not takes_kwargs:
                errors.append(f"{dotted}: {target} has no parameter {key!r}")
            continue
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            errors.append(f"{dotted}: expected {_name(expected)}, got {value!r} ({type(value).__name__})")


def _signature(obj: Any) -> tuple[dict[str, inspect.Parameter] | None, dict[str, Any], bool]:
    """Parameters, type hints and whether ``**kwargs`` is taken. cvarch's own classes forward ``**kwargs`` to
    their base class, so for them the MRO is followed and the bases' parameters are checked too."""
    funcs = [obj]
    if inspect.isclass(obj):  # the class itself, then the __init__ of each cvarch base it forwards to
        funcs += [
            c.__init__ for c in obj.__mro__[1:] if "__init__" in vars(c) and c.__module__.startswith("cvarch")
        ]
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for func in funcs:
        try:
            own = inspect.signature(func).parameters
        except (TypeError, ValueError):
            return None, {}, True
        try:
            own_hints = typing.get_type_hints(func.__init__ if inspect.isclass(func) else func)
        except Exception:
            own_hints = {}
        for name, param in own.items():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and name != "self":
                params.setdefault(name, param)
                if name in own_hints:
                    hints.setdefault(name, own_hints[name])
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return params, hints, False
        if not getattr(func, "__module__", "").startswith("cvarch"):
            break
    return params, hints, True


_UNION_TYPES = (typing.Union, types.UnionType)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a config value can be passed where ``annotation`` is expected; lenient where unsure."""
    if value is None or (isinstance(value, dict) and "_target_" in value):
        return True  # null is for the target to judge; nested targets are instantiated before the call
    origin = typing.get_origin(annotation)
    if origin in _UNION_TYPES:
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is torch.Tensor:  # e.g. SGD's lr: float | Tensor; a config can only give a number
        return isinstance(value, (int, float))
    container = origin or annotation
    if container in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, (list, tuple))
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    return True


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
