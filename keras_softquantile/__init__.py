"""Differentiable soft top-k and quantile selection for Keras, by entropic optimal transport."""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

__all__ = [
    "EpsilonWeight",
    "LinearScorer",
    "QuantileObjectiveModel",
    "SoftQuantileMasks",
    "SoftQuantileSplit",
    "SoftQuantiles",
    "SoftRank",
    "SoftSort",
    "SoftTopK",
    "callbacks",
    "data",
    "epsilon",
    "epsilon_weights",
    "layers",
    "losses",
    "metrics",
    "models",
    "objectives",
    "ops",
    "perturbed_quantile_split",
    "soft_quantile",
    "soft_quantile_masks",
    "soft_quantile_split",
    "soft_rank",
    "soft_sort",
    "soft_sort_with",
    "soft_topk_mask",
]

_SUBMODULES = frozenset(
    {
        "callbacks",
        "data",
        "epsilon",
        "layers",
        "losses",
        "metrics",
        "models",
        "objectives",
        "ops",
    }
)

# Each public class and function, by the submodule that defines it.
_PUBLIC_NAMES = {
    "EpsilonWeight": "epsilon",
    "epsilon_weights": "epsilon",
    "LinearScorer": "models",
    "QuantileObjectiveModel": "models",
    "SoftQuantileMasks": "layers",
    "SoftQuantileSplit": "layers",
    "SoftQuantiles": "layers",
    "SoftRank": "layers",
    "SoftSort": "layers",
    "SoftTopK": "layers",
    "perturbed_quantile_split": "ops",
    "soft_quantile": "ops",
    "soft_quantile_masks": "ops",
    "soft_quantile_split": "ops",
    "soft_rank": "ops",
    "soft_sort": "ops",
    "soft_sort_with": "ops",
    "soft_topk_mask": "ops",
}

# The name of the console script declared in setup.cfg (`[options.entry_points]`).
_CONSOLE_SCRIPT = "keras-softquantile"


def __getattr__(name: str):
    """Imports a public submodule, class or function on first access (PEP 562).

    Only reached when the eager imports at the end of this module were skipped, i.e. when the
    package was imported to run its own command line (`_imported_to_run_own_command_line`).

    Args:
        name: the attribute looked up on the package.

    Returns:
        The submodule, class or function.

    Raises:
        AttributeError: `name` is not a public name of the package.
    """
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _PUBLIC_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _module_run_with_dash_m(args: list[str]) -> str | None:
    """The module that the interpreter command line `args` (`sys.orig_argv`) runs with `-m`.

    Reads the interpreter's options up to the first one that ends them: `-m MODULE`,
    `-c COMMAND` or a script. Options may be grouped (`-Im MODULE`, `-mMODULE`); `-W` and `-X`
    take a value, which may contain an "m".

    Args:
        args: the interpreter's command line, the executable first.

    Returns:
        The module's name, or None when `args` runs no module.
    """
    position = 1
    while position < len(args) and args[position].startswith("-") and args[position] != "-":
        option = args[position]
        position += 1
        if option.startswith("--"):
            position += option == "--check-hash-based-pycs"  # the only long option with a value
            continue
        for index, letter in enumerate(option[1:], start=2):
            if letter in "cmWX":  # the short options that take a value
                value = option[index:]
                if not value and position < len(args):
                    value = args[position]
                    position += 1
                if letter in "cm":
                    return value if letter == "m" else None
                break
    return None


def _imported_to_run_own_command_line() -> bool:
    """Whether the package is being imported as the first step of running its command line.

    The command line (`keras_softquantile.__main__`) parses its options before it imports
    Keras and TensorFlow itself, so that `--help` and a bad option answer at once. Python
    imports this package before `__main__` runs, in two ways:

    * `python -m keras_softquantile ...`: while `-m` locates the module, which includes
      importing this package, `sys.argv[0]` is the string "-m" (documented for the `-m`
      option), and `sys.orig_argv` says which module `-m` runs; another program run with
      `-m` that imports this package gets the eager imports.
    * the console script `keras-softquantile` (setup.cfg's entry point
      `keras_softquantile.__main__:main`): `sys.argv[0]` is the script's path.

    Every other import (library use) imports all submodules at once. That is what registers
    the package's `keras.saving.register_keras_serializable` classes and functions, which
    `keras.saving.load_model` looks up by name without importing anything.

    Returns:
        True for the command line's own import, False otherwise.
    """
    argv = getattr(sys, "argv", None) or [""]
    if argv[0] == "-m":
        module = _module_run_with_dash_m(list(getattr(sys, "orig_argv", ())))
        return module in (__name__, f"{__name__}.__main__")
    script = os.path.basename(argv[0])
    # On Windows the launcher is `keras-softquantile.exe` (older ones ran `...-script.py`).
    for suffix in (".exe", "-script.py", "-script.pyw"):
        script = script.removesuffix(suffix)
    return script == _CONSOLE_SCRIPT


if not _imported_to_run_own_command_line():
    from keras_softquantile import _tensorflow_logs

    _tensorflow_logs.import_tensorflow()  # held to TF_CPP_MIN_LOG_LEVEL from its first line

    from keras_softquantile import (
        callbacks,
        data,
        epsilon,
        layers,
        losses,
        metrics,
        models,
        objectives,
        ops,
    )
    from keras_softquantile.epsilon import EpsilonWeight, epsilon_weights
    from keras_softquantile.layers import (
        SoftQuantileMasks,
        SoftQuantiles,
        SoftQuantileSplit,
        SoftRank,
        SoftSort,
        SoftTopK,
    )
    from keras_softquantile.models import LinearScorer, QuantileObjectiveModel
    from keras_softquantile.ops import (
        perturbed_quantile_split,
        soft_quantile,
        soft_quantile_masks,
        soft_quantile_split,
        soft_rank,
        soft_sort,
        soft_sort_with,
        soft_topk_mask,
    )
