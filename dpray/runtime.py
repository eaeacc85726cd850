"""Ray connection, temp and cache directories, seeds.

Local by default: ``ray.init`` with its session directory inside the run directory (never the
shared ``/tmp/ray``), so two users or two test runs on one machine never share Ray state.  With
``--address``/``ray.address``/``RAY_ADDRESS`` it joins an existing cluster instead, which is how
``ray start --head`` + ``dpray run --address auto`` and ``ray job submit -- dpray run`` work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from dpray.config import DprayConfig
from dpray.rundir import RunDir, owner_only_dir

log = logging.getLogger(__name__)

# Ray's unix socket paths (session dir + "/sockets/plasma_store") must fit in 107 bytes.
MAX_RAY_TEMP_LEN = 40


def cache_root() -> Path:
    """Per-machine cache (converted models, compiled extensions): $DPRAY_CACHE_DIR or ~/.cache."""
    return Path(os.environ.get("DPRAY_CACHE_DIR", Path.home() / ".cache" / "dpray"))


def configure_caches(run_dir: RunDir) -> None:
    """Point torch-extension, Triton and vLLM caches at our cache, not shared /tmp paths."""
    root = cache_root()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ray_temp_dir(config: DprayConfig, run_dir: RunDir) -> Path:
    """Where a local Ray keeps its session: config, else ``RUN_DIR/private/.ray`` if short enough.

    Inside ``private/`` because worker logs and spilled objects land there; the fallback under the
    cache is made 0700 like the private zone (see :func:`ensure_ray`).
    """
    if config.ray.temp_dir:
        return Path(config.ray.temp_dir).expanduser().resolve()
    candidate = run_dir.private_root / ".ray"
    if len(str(candidate)) <= MAX_RAY_TEMP_LEN:
        return candidate
    digest = hashlib.sha256(str(run_dir.root).encode()).hexdigest()[:10]
    return cache_root() / "ray" / digest


def progress_enabled(config: DprayConfig) -> bool:
    """Whether long work shows progress: the config's ``progress``, else only on a terminal."""
    if config.progress is not None:
        return config.progress
    return sys.stdout.isatty() and sys.stderr.isatty()


def configure_progress(config: DprayConfig) -> bool:
    """Ray Data's own progress bars on or off for this driver, from :func:`progress_enabled`.

    Why one switch: on a terminal Ray Data draws tqdm bars, but where stdout is not a terminal
    (a pipe, ``tee``, CI, ``ray job submit``) it instead logs a block of "Active & requested
    resources" lines every 10 s, which buries dpray's own log.  So bars by default on a terminal,
    nothing by default elsewhere, and ``progress: true`` opts back in to Ray's periodic lines.
    Bars name operators (``MapBatches(SamplingActor)``) and counts, never a record's text.
    """
    from ray.data import DataContext

    enabled = progress_enabled(config)
    DataContext.get_current().enable_progress_bars = enabled
    # Off, Ray Data warns once that its bars are disabled and names its own knob; dpray's is
    # `progress`, so that notice (and any progress line) stays out of the console.
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.NOTSET if enabled else logging.ERROR
    )
    return enabled


def ensure_ray(config: DprayConfig, run_dir: RunDir) -> None:
    """Connect to Ray once per process (no-op when already connected)."""
    import ray

    configure_caches(run_dir)
    configure_progress(config)
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    temp_dir = ray_temp_dir(config, run_dir)
    # Session logs, spilled objects and Ray Train's staging hold private data: owner-only.  Ray
    # makes its temp folder 0777 (for machine-wide sharing), so ours sits in a 0700 parent
    # (private/ itself, or the cache fallback's ray/), and is set back to 0700 once Ray is up.
    # A configured ray.temp_dir is the user's: 0700 only when dpray creates it.
    ours = not config.ray.temp_dir
    if ours:
        owner_only_dir(temp_dir.parent)
    if ours or not temp_dir.exists():
        owner_only_dir(temp_dir)
    log.info("starting a local Ray (session files in %s)", temp_dir)
    ray.init(
        _temp_dir=str(temp_dir),
        num_cpus=config.ray.num_cpus,
        # The dashboard process serves Ray's state API; without it Ray Train's placement-group
        # cleaner cannot see its controller and logs a warning every few seconds.  Loopback only.
        # Only where ray[default] is installed (the vLLM environment has the minimal Ray).
        include_dashboard=dashboard_available(),
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    if ours:
        owner_only_dir(temp_dir)


def dashboard_available() -> bool:
    """Whether this Ray install can start its dashboard (``ray[default]`` dependencies)."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # a Ray without the helper: let it decide
        return False
    return get_dashboard_dependency_error() is None


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
