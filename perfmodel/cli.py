"""The `moeperf` command. Each subcommand lives beside the code it drives and exposes
`main(argv: list[str]) -> int`; this module only dispatches and turns bad input into one
line and exit status 2; environment failures (disk full, permission denied, read-only folder, a file
where a folder should be, an --out held by another command: perfmodel.envfail) and internal failures
are one line and exit 1.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module exposing main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("perfmodel.specs.validate", "check spec YAML files (model, cluster, plan, study, profile)"),
    "presets": ("perfmodel.specs.validate", "list the built-in presets"),
    "simulate": ("perfmodel.sim.command", "simulate one training iteration of a plan (or a study's fixed plans)"),
    "search": ("perfmodel.search.cli", "search a study's plan space and write a ranked report"),
    "data": ("runtime.data_prepare", "tokenize text for `run --data` (data prepare)"),
    "run": ("runtime.launch", "run a plan as real distributed training (torchrun)"),
    "calibrate": ("perfmodel.calibrate", "fit a hardware profile from recorded traces"),
    "compare": ("perfmodel.compare", "run/read a study's plans and compare predicted vs measured"),
}

USAGE = "usage: moeperf [-h] COMMAND [ARGS...]\n\ncommands:\n" + "".join(
    f"  {name:<10} {help_}\n" for name, (_, help_) in COMMANDS.items()
) + ("\nEvery command takes --help; most take --json. Exit 0 ok, 2 bad input, 1 environment (disk full, "
      "permission denied, ...) or internal failure.\n")


def _fail(msg: str) -> int:
    print(f"moeperf: error: {' '.join(str(msg).split())}", file=sys.stderr)  # one line, always
    return 2


def _internal(name: str, exc: BaseException) -> int:
    """An unexpected exception: one line and exit 1 (MOEPERF_DEBUG=1 re-raises for the traceback)."""
    if os.environ.get("MOEPERF_DEBUG"):
        raise exc
    print(f"moeperf {name}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]} "
          "(set MOEPERF_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from perfmodel import __version__

        print(f"moeperf {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return _fail(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    from perfmodel import envfail
    from perfmodel.specs import SpecError

    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
        entry = getattr(module, f"main_{name}", None) or getattr(module, "main", None)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            print(f"moeperf {name}: not available yet", file=sys.stderr)
            return 1
        return _fail(f"{name} needs the Python package {exc.name!r}; install it (see README)")
    if entry is None:
        print(f"moeperf {name}: not available yet", file=sys.stderr)
        return 1
    try:
        return int(entry(rest) or 0)
    except SpecError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("moeperf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except SystemExit as exc:  # argparse --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MemoryError:
        return _fail(f"{name}: out of memory (input too large?)")
    except RecursionError:
        return _fail(f"{name}: input nested too deeply")
    except (OSError, envfail.EnvError) as exc:  # disk full, permission denied, ... on an output path
        return envfail.fail(name, exc)  # inputs are read through yamlsafe/trace_reader: SpecError, not here
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        return _internal(name, exc)


if __name__ == "__main__":
    sys.exit(main())
