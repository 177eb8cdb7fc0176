"""What every experiment entry point shares about its command line: one-line errors,
output paths checked before any work starts, and quiet library logs."""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile

from absl import app, flags


def prog() -> str:
    """The entry point's short name: `python -m experiments.throughput` → throughput."""
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def fail(msg: str):
    """Exit non-zero with one line naming the entry point."""
    sys.exit(f"{prog()}: {msg}")


HELP_FLAGS = ("-?", "-h", "-help", "--help", "--helpshort", "-helpshort", "--helpfull",
              "-helpfull", "--helpxml", "-helpxml")


def parse_flags(argv):
    """absl's flag parsing with a bad flag reported as one line (absl's own parser
    prints a second line of help hints), and help asked for exiting 0 (absl: 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def require(*modules: str, extra: str) -> None:
    """One line, before any work, when an optional package is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"needs {', '.join(missing)}, not installed: pip install -e '.[{extra}]'")


def run(main) -> None:
    """`app.run(main)` with one-line flag errors."""
    app.run(main, flags_parser=parse_flags)


def finite_flag(name: str, positive: bool = False) -> None:
    """Refuse NaN and ±inf (absl's bounds let NaN through), and ≤ 0 if `positive`."""
    flags.register_validator(
        name, lambda v: v is None or (math.isfinite(v) and (v > 0 or not positive)),
        message="must be a finite number" + (" > 0" if positive else ""))


def check_presets(names) -> None:
    """One-line exit naming the setups (model_config/setups.py) that do not exist."""
    from moejax.model_config.setups import setup_names

    bad = [p for p in names if p not in setup_names()]
    if bad:
        fail(f"unknown preset(s) {', '.join(bad)}; valid: {', '.join(setup_names())}")


def no_extra_args(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")


def writable(path: str) -> bool:
    """Whether a file can be written at `path`: it is an existing writable file, or a
    scratch file can be created in its nearest existing ancestor directory (the rest of
    the path is created on writing) — tried for real, so read-only mounts and /proc
    say no even to root."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return os.path.isfile(path) and os.access(path, os.W_OK)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return False
    try:
        with tempfile.TemporaryFile(dir=parent):
            return True
    except OSError:
        return False


def output_flag(name: str, suffix: str | None = None, allow_empty: bool = False) -> None:
    """Validate the output-path flag `name` at start-up: a writable location (and the
    `suffix`, if given), so a bad path fails before a long run, not after it."""
    def ok(v):
        if v is None or (allow_empty and v == ""):
            return True
        return (suffix is None or v.lower().endswith(suffix)) and writable(
            v.replace("{config}", "x"))
    flags.register_validator(name, ok, message="must be a writable "
                             + (f"{suffix} " if suffix else "") + "file path")


def quiet_logs() -> None:
    """Library INFO chatter off (JAX's backend probing, orbax's per-step lines)."""
    from absl import logging as absl_logging

    if flags.FLAGS["verbosity"].present:  # the user asked for a level: keep it
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax._src.xla_bridge", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
