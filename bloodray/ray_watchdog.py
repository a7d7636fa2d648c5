"""A watchdog that ends the local Ray cluster a bloodray process started when that process dies abruptly.

After a SIGKILL (or the OOM killer) of a driver that started a local cluster,
GCS, raylet and workers follow it within seconds, but Ray's DashboardAgent and
RuntimeEnvAgent (~210 MB together) see their raylet die "unexpectedly" and
first try to report it to the (dead) GCS, with Ray's hard-wired 60 s timeout
per attempt: they outlived the driver for a minute or more.

:func:`start` (called by :func:`bloodray.logs.init_ray` right after it started a
local cluster) launches ``python -m bloodray.ray_watchdog``: a small stdlib-only
process that keeps a list of the driver's Ray processes (refreshed every
second) and waits for the end of a pipe only the driver holds. When the driver
is gone, it sends SIGTERM, then SIGKILL after :data:`GRACE_S`, to every listed
process that is still the same process (same start time). Linux only (it reads
``/proc``); elsewhere nothing is started.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

#: Seconds between SIGTERM and SIGKILL of a Ray process left behind.
GRACE_S = 2.0
#: Seconds between refreshes of the list of the driver's Ray processes.
REFRESH_S = 1.0


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[1]), fields[19]) if fields[0] != "Z" else None


def _is_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ")
    except OSError:
        return False
    # gcs_server, raylet, dashboard and agents run from the ray package; workers are "ray::<name>", the
    # dashboard's modules "ray-dashboard-<name>".
    return cmd.startswith((b"ray::", b"ray-")) or b"/ray/" in cmd


def ray_processes(driver: int) -> dict[int, str]:
    """``{pid: start time}`` of the Ray processes descending from ``driver``, and everything they started."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info:
                children.setdefault(info[0], []).append(int(name))
                starts[int(name)] = info[1]
    found: dict[int, str] = {}
    stack = [(driver, False)]
    while stack:
        parent, under_ray = stack.pop()
        for pid in children.get(parent, []):
            if pid != os.getpid() and pid in starts:
                ray = under_ray or _is_ray(pid)
                stack.append((pid, ray))
                if ray:
                    found[pid] = starts[pid]
    return found


def _end(processes: dict[int, str]) -> None:
    """SIGTERM, then SIGKILL, each listed process that still is the process listed."""
    def alive() -> list[int]:
        return [pid for pid, start in processes.items() if (_stat(pid) or (0, ""))[1] == start]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def watch(driver: int, fd: int) -> None:
    """Until ``fd`` (the read end of the driver's pipe) reaches end of file, track; then end what is left."""
    known: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([fd], [], [], REFRESH_S)
        if ready and not os.read(fd, 1):
            break
        known.update(ray_processes(driver))
    _end(known)


def started_local_cluster() -> bool:
    """True when this process is the parent of a raylet: ``ray.init`` started a local cluster (Linux only)."""
    if not os.path.isdir("/proc"):
        return False
    for name in os.listdir("/proc"):
        if name.isdigit() and (_stat(int(name)) or (0, ""))[0] == os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    if fh.read().split(b"\0", 1)[0].endswith(b"/raylet"):
                        return True
            except OSError:
                continue
    return False


def start() -> subprocess.Popen | None:
    """Start the watchdog for this process's local Ray cluster (Linux; None elsewhere)."""
    if not os.path.isdir("/proc"):
        return None
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "bloodray.ray_watchdog", str(os.getpid()), str(read_end)],
                                pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        os.close(read_end)
    # The write end stays open, unread, for the life of this process; its end is the signal. Not inheritable,
    # so no child keeps it open after the driver is gone.
    os.set_inheritable(write_end, False)
    return proc


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
