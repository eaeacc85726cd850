"""What a failure means to the person at the terminal: one line and one documented exit code.

The CLI's error boundary (:func:`dpray.cli.main`) turns every known failure into a single line
that names what to fix -- a file, a config key or an address -- and exits with the code below;
a traceback only with ``--debug``.  Known failures come from two places: the exceptions dpray's
modules already raise (config, data, budget, leak) and the preflight checks
(:mod:`dpray.preflight`) that run before Ray starts.  Messages never quote private text: they
name paths, keys and counts only.
"""

from __future__ import annotations

from pathlib import Path

EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_BUDGET = 4
EXIT_LEAK = 5
EXIT_MISSING_INPUT = 6
EXIT_RESOURCES = 7
EXIT_CLUSTER = 8
EXIT_RUN_DIR = 9
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    0: "success",
    EXIT_UNEXPECTED: "unexpected error (details in RUN_DIR/private/logs/dpray.log; --debug "
    "prints the traceback)",
    EXIT_CONFIG: "config: bad key or value, a missing config file, a model that cannot be found",
    EXIT_DATA: "input data: data.path missing or unreadable, no valid records",
    EXIT_BUDGET: "privacy budget: the run would spend more than privacy.epsilon",
    EXIT_LEAK: "leak scan: private text in a public file",
    EXIT_MISSING_INPUT: "an earlier stage's output is missing: run that stage first",
    EXIT_RESOURCES: "resources: GPUs (or a node shape) asked for that the machine or cluster "
    "does not have",
    EXIT_CLUSTER: "Ray cluster: the address does not answer",
    EXIT_RUN_DIR: "run directory: not writable, or a file in it is corrupted",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class DprayError(Exception):
    """A known failure: its message is the one line shown, ``exit_code`` the documented code."""

    exit_code = EXIT_UNEXPECTED
    label = "error"


class MissingInputError(DprayError):
    exit_code = EXIT_MISSING_INPUT
    label = "missing input"


class ResourceError(DprayError):
    exit_code = EXIT_RESOURCES
    label = "resources"


class ClusterUnreachableError(DprayError):
    exit_code = EXIT_CLUSTER
    label = "Ray cluster"


class RunDirError(DprayError):
    exit_code = EXIT_RUN_DIR
    label = "run directory"


class ModelNotFoundError(DprayError):
    exit_code = EXIT_CONFIG
    label = "model"


def exit_codes_text() -> str:
    """The exit-code table for ``dpray --help`` (the README carries the same table)."""
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


def classify(exc: BaseException, run_root: Path | None = None) -> tuple[int, str, str] | None:
    """``(exit code, label, message)`` for a known failure, else None (an unexpected error).

    Exceptions of other modules are imported lazily: this runs after a failure, and the CLI
    must not pay for importing them on every start.
    """
    from dpray.config import ConfigError
    from dpray.io.readers import SourceError
    from dpray.privacy.ledger import BudgetExceededError

    if isinstance(exc, DprayError):
        return exc.exit_code, exc.label, str(exc)
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG, "config error", str(exc)
    if isinstance(exc, SourceError):
        return EXIT_DATA, "data error", str(exc)
    if isinstance(exc, BudgetExceededError):
        return EXIT_BUDGET, "privacy budget", str(exc)
    name = type(exc).__name__
    module = type(exc).__module__
    if name == "IngestError" and module == "dpray.stages.ingest":
        return EXIT_DATA, "data error", str(exc)
    if name == "LeakError" and module == "dpray.pipeline":
        return EXIT_LEAK, "leak scan", str(exc)
    if name == "ScanInputError" and module == "dpray.audit.leaks":
        return EXIT_CONFIG, "leak scan", str(exc)
    if name == "ResourceError" and module == "dpray.resources":
        return EXIT_RESOURCES, "resources", str(exc)
    if name == "ModelSpecError" and module == "dpray.models.loader":
        return EXIT_CONFIG, "model", str(exc)
    if isinstance(exc, ConnectionError) and "ray" in str(exc).lower():
        # Ray's own "could not find/connect to a Ray instance" (address auto, or a lost head)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return EXIT_CLUSTER, "Ray cluster", f"{first} (--address, ray.address, RAY_ADDRESS)"
    if isinstance(exc, FileNotFoundError) and exc.filename and run_root is not None:
        path = Path(str(exc.filename))
        if _inside(path, run_root):
            return EXIT_MISSING_INPUT, "missing input", missing_input_message(path, run_root)
    if isinstance(exc, PermissionError) and exc.filename and run_root is not None:
        path = Path(str(exc.filename))
        if _inside(path, run_root):
            return EXIT_RUN_DIR, "run directory", f"{path}: permission denied (run_dir, --run-dir)"
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


STAGE_FOLDERS = {
    "ledger.json": "ingest",
    "ingest": "ingest",
    "generator": "train-generator",
    "generator_rounds": "train-generator",
    "generator_draws": "train-generator",
    "train": "train-generator",
    "sample": "sample",
    "sample_draws": "sample",
    "embed": "embed",
    "embed_cache": "embed",
    "filter": "filter",
    "annotate": "annotate",
    "sft": "sft",
    "reward": "reward",
    "ppo": "ppo",
    "evaluate": "evaluate",
}
"""Run-directory folders (public, or under private/) and the stage that writes them."""


def producer(relative: Path) -> str | None:
    """The stage that writes ``relative`` (a path inside the run directory), if known."""
    parts = list(relative.parts)
    if parts and parts[0] == "private":
        parts = parts[1:]
    return STAGE_FOLDERS.get(parts[0]) if parts else None


def missing_input_message(path: Path, run_root: Path) -> str:
    """One line for an earlier stage's missing output: the file and the command that writes it."""
    try:
        relative = path.parent.resolve().relative_to(run_root.resolve()) / path.name
    except ValueError:
        return f"{path} does not exist"
    stage = producer(relative)
    hint = f"; run `dpray {stage} CONFIG` (or `dpray run`) first" if stage else ""
    return f"RUN_DIR/{relative} does not exist (run directory {run_root}){hint}"
