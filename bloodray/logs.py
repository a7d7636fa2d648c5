"""Console output of the ``bloodray`` command: its own log lines, Ray's, and progress bars.

The command line calls :func:`setup_logging` once; library code only logs
(``logging.getLogger(__name__)``), starts Ray through :func:`init_ray` and wraps
long loops in :func:`progress`. Without :func:`setup_logging` (bloodray used as
a library, in a notebook or a test) nothing here changes Ray's or Python's
defaults, and progress bars follow tqdm's own rule (shown on a terminal only).

Levels (``verbosity``): ``-1`` (``--quiet``) bloodray's warnings and errors
only, Ray's errors only, no progress bars: a clean run leaves stderr empty
(:func:`own_process_output`); ``0`` (default) bloodray's progress lines at INFO, Ray at
WARNING, Ray Data's own progress bars and execution banners off (bloodray's bar
replaces them); ``1`` (``--verbose``) bloodray at DEBUG and Ray as Ray itself
configures it (worker output forwarded, Ray Data's bars back).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

QUIET, DEFAULT, VERBOSE = -1, 0, 1

#: Set by :func:`setup_logging`; ``None`` means "used as a library: leave Ray's defaults alone".
_verbosity: int | None = None
#: Set by :func:`own_process_output`: the command line owns this process's file descriptors.
_owns_process = False
#: Where the process's native stderr went (:func:`divert_native_stderr`), once it did.
_native_stderr: str | None = None
#: The :mod:`bloodray.ray_watchdog` process of the local cluster this process started, if any.
_watchdog: Any = None
#: The signal :func:`exit_on_sigterm`'s handler received, if any.
_terminated_by: int | None = None


class _OneLine(logging.Formatter):
    """``bloodray: message`` (or ``bloodray WARNING: message``); tracebacks only at DEBUG."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "bloodray" if record.levelno == logging.INFO else f"bloodray {record.levelname}"
        text = f"{prefix}: {record.getMessage()}"
        if record.exc_info and _verbosity is not None and _verbosity >= VERBOSE:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    # Python's default prints two lines (file:line and the source line); a user
    # needs the message, which names the file or URI at fault.
    kind = "" if category is UserWarning else f"{category.__name__}: "
    logging.getLogger("bloodray").warning("%s%s", kind, message)


def setup_logging(verbosity: int = DEFAULT) -> None:
    """Configure console output for one ``bloodray`` command; safe to call again (tests do).

    Must run before Ray is started: Ray Data reads ``RAY_DATA_LOG_LEVEL`` when
    it configures its loggers.
    """
    global _verbosity
    _verbosity = max(QUIET, min(VERBOSE, int(verbosity)))
    level = {QUIET: logging.WARNING, DEFAULT: logging.INFO, VERBOSE: logging.DEBUG}[_verbosity]
    logger = logging.getLogger("bloodray")
    for handler in [h for h in logger.handlers if getattr(h, "_bloodray", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._bloodray = True  # type: ignore[attr-defined]
    handler.setFormatter(_OneLine())
    logger.addHandler(handler)
    logger.setLevel(level)
    # Records still propagate: the command line's root logger has no handler
    # (Ray configures only "ray"), and pytest's caplog listens on the root.
    warnings.showwarning = _show_warning
    if _verbosity < VERBOSE:
        # Ray Data's own context warns about its own deprecated settings whenever it is copied to workers;
        # nothing a user of bloodray can act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
        # Ray Data logs "Starting execution of Dataset ..." and its plan at INFO to the console.
        os.environ["RAY_DATA_LOG_LEVEL"] = "ERROR" if _verbosity <= QUIET else "WARNING"
    else:
        os.environ.pop("RAY_DATA_LOG_LEVEL", None)


def verbosity() -> int | None:
    """The level set by :func:`setup_logging`, or ``None`` when it was never called."""
    return _verbosity


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments of ``ray.init`` for the configured verbosity (empty as a library)."""
    if _verbosity is None or _verbosity >= VERBOSE:
        return {}
    # log_to_driver=False stops workers' stdout/stderr (model summaries, Ray
    # Data's per-task lines) from being copied to the console; a task that
    # fails still raises in the driver with its traceback, and every worker
    # log stays in Ray's session log directory. Quiet: Ray's errors only (a
    # new local cluster warns that it turned token authentication on, every time).
    return {"log_to_driver": False, "logging_level": logging.ERROR if _verbosity <= QUIET else logging.WARNING}


def configure_ray_data() -> None:
    """Ray Data's console settings for the configured verbosity (driver-side ``DataContext``)."""
    if _verbosity is None or _verbosity >= VERBOSE:
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # bloodray's own bar (progress()) counts images; Ray Data's per-operator
    # bars show "0/?" for streaming reads and interleave with log lines.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Turning the bars off makes Ray Data warn how to turn them on again; that
    # one line is about our own setting, so it is dropped (nothing else is).
    progress_logger = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropBarsDisabled) for f in progress_logger.filters):
        progress_logger.addFilter(_DropBarsDisabled())


class _DropBarsDisabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


class RayStartError(RuntimeError):
    """Ray could not start a local cluster or join ``RAY_ADDRESS`` (an infrastructure failure, exit status 5)."""


def init_ray(*, dashboard: bool = True, **kwargs: Any) -> None:
    """Start or join Ray (``RAY_ADDRESS``, else a local cluster) unless it already runs.

    With :func:`setup_logging` called, Ray's own console output is turned down
    to warnings (see :func:`ray_init_kwargs`); ``kwargs`` go to ``ray.init``.
    Raises :class:`RayStartError` when Ray cannot start or join a cluster.
    ``dashboard=False`` starts a local cluster without Ray's dashboard (a cluster
    that is joined keeps its own): the dashboard and its head processes
    cost about 3.3 CPU seconds of a classify run's start-up
    (``bench/fixed_cost.py``) and nobody watches a cluster that lives for one run.
    A local cluster started here gets a :mod:`bloodray.ray_watchdog`, which
    ends its processes within seconds if this process is killed.
    """
    import ray

    global _watchdog
    if not ray.is_initialized():
        local = "address" not in kwargs and not os.environ.get("RAY_ADDRESS")
        try:
            ray.init(**{**({"include_dashboard": False} if local and not dashboard else {}),
                        **ray_init_kwargs(), **kwargs})
        except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions (e.g. "node timed out during startup")
            where = os.environ.get("RAY_ADDRESS") or "a local cluster"
            text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayStartError(f"Ray: could not start or join {where}: {text}") from exc
        from bloodray import ray_watchdog

        if _watchdog is None and ray_watchdog.started_local_cluster():
            # Ray's agents outlive a SIGKILLed driver by a minute or more (bloodray/ray_watchdog.py says why).
            _watchdog = ray_watchdog.start()
        if _owns_process and _verbosity is not None and _verbosity <= QUIET:
            divert_native_stderr()
    configure_ray_data()


def own_process_output() -> None:
    """Declare that the command line owns this process's output (``bloodray`` and ``jobs/*.py`` call it).

    Only then may :func:`init_ray` move the process's native stderr aside in
    quiet mode (:func:`divert_native_stderr`); bloodray used as a library, or
    under pytest, never has its file descriptors touched.
    """
    global _owns_process
    _owns_process = True


def divert_native_stderr() -> str | None:
    """Send what native code writes to this process's stderr (fd 2) to a file in Ray's log directory.

    Ray's C++ core worker in the driver prints its ERROR lines to fd 2, besides
    its own log file. With Ray Data every actor pool triggers one: Ray Data
    passes its context and transform to the actors as object refs, and with
    actor restarts on, the core worker warns that such arguments may be lost
    (ray-project/ray#53727, #57733), a false alarm here (the refs live as long
    as the dataset). It cannot be avoided from outside Ray Data (turning actor
    restarts off would lose the recovery from a killed actor), and
    ``RAY_BACKEND_LOG_LEVEL`` prints a line of its own and silences the log
    files of every Ray process. So, in quiet mode, fd 2 goes to
    ``<session>/logs/bloodray-driver-<pid>.err`` (the driver's C++ errors are
    in ``python-core-driver-*.log`` anyway) while Python's ``sys.stderr`` (bloodray's
    lines, Ray's Python errors, tracebacks) keeps the real stderr. Returns the file's path.
    """
    global _native_stderr
    if _native_stderr is not None:
        return _native_stderr
    try:
        import ray

        logs_dir = ray._private.worker._global_node.get_logs_dir_path()  # noqa: SLF001 - no public accessor
    except Exception:  # noqa: BLE001 - a Ray without it: keep stderr as it is
        return None
    path = os.path.join(logs_dir, f"bloodray-driver-{os.getpid()}.err")
    sys.stderr.flush()
    real = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                           errors="backslashreplace")
    for handler in logging.getLogger("bloodray").handlers:
        if getattr(handler, "_bloodray", False):
            handler.setStream(sys.stderr)  # type: ignore[attr-defined]
    _native_stderr = path
    logging.getLogger(__name__).debug("native stderr of the driver goes to %s", path)
    return path


class _Counter:
    """The do-nothing bar of a quiet run: same ``update`` as tqdm's."""

    def update(self, n: int = 1) -> None:  # noqa: D401 - tqdm's signature
        pass

    def set_postfix_str(self, s: str = "") -> None:
        pass


@contextmanager
def progress(total: int | None = None, desc: str = "", unit: str = "img") -> Iterator[Any]:
    """A progress bar on stderr: ``with progress(total=n, desc="classify") as bar: bar.update(k)``.

    Hidden with ``--quiet`` and whenever stderr is not a terminal (tqdm's rule),
    so logs and CI output hold no bar lines.
    """
    if _verbosity is not None and _verbosity <= QUIET:
        yield _Counter()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True,
               mininterval=0.5, leave=True)
    try:
        yield bar
    finally:
        bar.close()


def terminated_by() -> int | None:
    """The signal number that stopped this command (see :func:`exit_on_sigterm`), or ``None``.

    Whatever was running when SIGTERM arrived may turn the ``SystemExit`` into its own error (DuckDB raises
    ``RuntimeError: Query interrupted``); the command line reports the signal instead, in one line.
    """
    return _terminated_by


def exit_on_sigterm() -> None:
    """Make SIGTERM a clean exit that stops the local Ray cluster the job started.

    Python's default for SIGTERM ends the process at once; after ``ray.init``
    Ray's failure signal handler (absl) aborts the driver on SIGTERM instead of
    letting ``ray.shutdown`` run, which leaves Ray's dashboard and runtime-env
    agents behind. So the handler is disabled (``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1``,
    unless set; it only prints stack traces of crashes) and SIGTERM raises
    ``SystemExit(143)`` (``ray.init`` installs its own equivalent, ``SystemExit(15)``),
    so exit handlers run. Only the command line calls it: library code never
    touches signal handlers or the environment.
    """
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

    def handler(signum, _frame):
        global _terminated_by
        _terminated_by = signum
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
