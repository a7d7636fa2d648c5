"""Exit statuses of the ``bloodray`` command: the one place they are defined.

A scheduler (cron, a CI runner, Airflow, KubeRay) reads the outcome of a run
from its exit status; ``bloodray classify --json`` prints the same outcome as
``status`` and ``exit_code`` in its summary (:mod:`bloodray.nightly.summary`).

=====  ========================  ===========================================================================
code   status                    meaning
=====  ========================  ===========================================================================
0      ``committed``             done: the run is committed (``classify``: and no domain-shift alarm)
1      ``crashed``               an unexpected error (a bug): Python's own status, with a traceback
2      ``refused``               a problem with the input, config or storage, named in one line: a config
                                 typo or bad value, an unreadable checkpoint, a missing bucket or input root,
                                 an archive root of date folders without ``run.date``, another run of the date
                                 in progress. Nothing was published; fix it and run again
3      ``nothing_to_do``         ``classify``: the date's folder is missing or holds no image: nothing ran
4      ``committed_with_alarm``  ``classify``: committed, under the domain-shift alarm (results unreliable)
5      ``infrastructure``        the Ray cluster or the storage failed (Ray did not start, a node or actor lost, no GPU
                                 for ``inference.num_gpus``, storage unreachable, a full disk); nothing was
                                 published; running again later may succeed
6      ``alarm_not_published``   ``classify``: the domain-shift alarm with ``shift.on_alarm: fail``: nothing
                                 was published
7      ``quality_gate``          the checkpoint fails the quality gate (:mod:`bloodray.quality_gate`): ``classify``
                                 was given a checkpoint never sealed by ``bloodray calibrate`` or whose val
                                 metrics miss the minimums; ``calibrate`` refused to seal one (without
                                 ``--force``). Nothing was published or sealed; use a better model
=====  ========================  ===========================================================================

Interrupted runs keep the usual Unix statuses (130 for Ctrl-C, 143 for SIGTERM,
141 for a closed pipe).
"""

from __future__ import annotations

import errno
import sys
from typing import Any

COMMITTED = 0
CRASHED = 1
REFUSED = 2
NOTHING_TO_DO = 3
COMMITTED_WITH_ALARM = 4
INFRASTRUCTURE = 5
ALARM_NOT_PUBLISHED = 6
QUALITY_GATE = 7

#: ``status`` of each code in ``--json`` summaries.
STATUS: dict[int, str] = {
    COMMITTED: "committed", CRASHED: "crashed", REFUSED: "refused", NOTHING_TO_DO: "nothing_to_do",
    COMMITTED_WITH_ALARM: "committed_with_alarm", INFRASTRUCTURE: "infrastructure",
    ALARM_NOT_PUBLISHED: "alarm_not_published", QUALITY_GATE: "quality_gate",
}

#: Errors with a code of their own, checked in order (module, class, code); every other expected error is
#: :data:`REFUSED`. By name, so a command never imports Ray or the nightly package just to map its error.
SPECIFIC_ERRORS: tuple[tuple[str, str, int], ...] = (
    ("bloodray.nightly.config", "NothingToClassify", NOTHING_TO_DO),
    ("bloodray.nightly.config", "ShiftAlarmError", ALARM_NOT_PUBLISHED),
    ("bloodray.quality_gate", "QualityGateError", QUALITY_GATE),
    ("bloodray.nightly.config", "ClusterResourcesError", INFRASTRUCTURE),
    ("bloodray.logs", "RayStartError", INFRASTRUCTURE),
    ("ray.exceptions", "RayError", INFRASTRUCTURE),
)

#: Errors (by name) of storage clients that mean "unreachable", not "wrong address or no permission".
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError"}
#: OS errors of a store that is there but cannot take the run (not a wrong path).
_INFRA_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def _loaded(module: str, name: str) -> type[BaseException] | None:
    # Only a module already imported can have raised its error; importing Ray here would cost seconds.
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def infrastructure_errors() -> tuple[type[BaseException], ...]:
    """Exception types that end a command with one line and :data:`INFRASTRUCTURE` (besides the expected ones)."""
    found = []
    for module, name, code in SPECIFIC_ERRORS:
        if code == INFRASTRUCTURE and (cls := _loaded(module, name)) is not None:
            found.append(cls)
    return tuple(found)


def _unreachable_storage(exc: BaseException) -> bool:
    """Whether a storage error was caused by an unreachable store or a full disk (its cause chain says)."""
    seen: set[int] = set()
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ConnectionError, TimeoutError)) or type(cause).__name__ in _UNREACHABLE:
            return True
        if isinstance(cause, OSError) and cause.errno in _INFRA_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def for_exception(exc: BaseException) -> int:
    """The exit status of a command that ended with ``exc`` (an expected error, printed as one line)."""
    for module, name, code in SPECIFIC_ERRORS:
        cls = _loaded(module, name)
        if cls is not None and isinstance(exc, cls):
            return code
    storage = _loaded("bloodray.storage", "StorageError")
    if storage is not None and isinstance(exc, storage) and _unreachable_storage(exc):
        return INFRASTRUCTURE
    return REFUSED


def for_run(result: Any) -> int:
    """The exit status of a committed classification run (a :class:`~bloodray.nightly.plan.RunResult`)."""
    return COMMITTED_WITH_ALARM if getattr(result, "domain_shift", False) else COMMITTED


def table() -> list[tuple[int, str]]:
    """``(code, status)`` of every exit status, in order (for docs and tests)."""
    return sorted(STATUS.items())

