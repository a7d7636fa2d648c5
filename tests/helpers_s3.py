"""moto's S3 server as a separate process, and a TCP forwarder (also a process of its own) to take S3 away and back.

moto runs out of the test process, as s3fs's own tests run it: code that blocks in native code without releasing the
GIL (deltalake's Rust) would otherwise starve a server thread in the same interpreter and time out.

Run as a script, this module is either process::

    python tests/helpers_s3.py moto -H 127.0.0.1 -p PORT          # python -m moto.server -H 127.0.0.1 -p PORT
    python tests/helpers_s3.py proxy LISTEN_PORT TARGET_PORT

The forwarder listens on 127.0.0.1:LISTEN_PORT and pipes every connection to 127.0.0.1:TARGET_PORT. Killing it frees
the port: new connections are refused at once, open ones are cut. Both exit by themselves when the process that
started them goes away, so a test run that is killed (SIGKILL, pytest-timeout) leaves no server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
_SCRIPT = str(Path(__file__).resolve())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on just now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _check_alive(proc: subprocess.Popen, what: str, log: Path | None) -> None:
    if proc.poll() is not None:
        tail = ""
        if log is not None and log.exists():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready{tail}")


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60, log: Path | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (and ``proc`` is still running)."""
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(proc, what, log)
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not accept connections on port {port} within {timeout:.0f} s")
            time.sleep(0.1)


def wait_for_http(endpoint: str, proc: subprocess.Popen, what: str, timeout: float = 60, log: Path | None = None) -> None:
    """Wait until ``endpoint`` answers HTTP; any status counts (a server that checks signatures answers 403)."""
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(proc, what, log)
        try:
            # moto's own API: not an AWS action, so it neither needs a signature nor counts against
            # INITIAL_NO_AUTH_ACTION_COUNT.
            with urllib.request.urlopen(f"{endpoint}/moto-api/config", timeout=5) as response:
                response.read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer HTTP at {endpoint} within {timeout:.0f} s")
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_moto(port: int | None = None, env: dict[str, str] | None = None,
               log: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` on 127.0.0.1 and wait until it answers HTTP; returns ``(process, endpoint)``.

    ``env`` is added to this process's environment; ``INITIAL_NO_AUTH_ACTION_COUNT`` and ``MOTO_PORT`` are not
    inherited (so requests are not checked unless ``env`` asks for it). Output goes to ``log`` or nowhere.
    """
    port = port or free_port()
    child_env = {k: v for k, v in os.environ.items() if k not in ("INITIAL_NO_AUTH_ACTION_COUNT", "MOTO_PORT")}
    child_env.update(env or {})
    log = Path(log) if log is not None else None
    with (open(log, "ab") if log is not None else contextlib.nullcontext(subprocess.DEVNULL)) as out:
        proc = subprocess.Popen([sys.executable, _SCRIPT, "moto", "-H", HOST, "-p", str(port)], env=child_env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://{HOST}:{port}"
    try:
        wait_for_http(endpoint, proc, "moto server", log=log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, endpoint


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None, log: str | Path | None = None):
    """:func:`start_moto` as a context manager; yields the endpoint URL and stops the server on exit."""
    proc, endpoint = start_moto(env=env, log=log)
    try:
        yield endpoint
    finally:
        stop_process(proc)


def start_proxy(listen_port: int, target_port: int) -> subprocess.Popen:
    """Start the forwarder (this file as a script) and wait until it accepts connections."""
    proc = subprocess.Popen([sys.executable, _SCRIPT, "proxy", str(listen_port), str(target_port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(listen_port, proc, "S3 forwarder", timeout=30)
    except BaseException:
        stop_process(proc)
        raise
    return proc


class OutageS3:
    """An S3 endpoint that can go away and come back on the same port, with its buckets and objects intact.

    moto runs on a private port the whole time; the public endpoint is a forwarder process. :meth:`stop` kills the
    forwarder (the port is freed: connections are refused at once, not left hanging), :meth:`start` starts a new one
    on the same port.
    """

    def __init__(self, log: str | Path | None = None):
        self._target = free_port()
        self._moto, _ = start_moto(self._target, log=log)
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self._proxy: subprocess.Popen | None = None
        try:
            self.start()
        except BaseException:
            stop_process(self._moto)
            raise

    @property
    def up(self) -> bool:
        return self._proxy is not None

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.kill()  # SIGKILL: the listening socket closes with the process
            self._proxy.wait()
            self._proxy = None

    def start(self) -> None:
        if self._proxy is None:
            self._proxy = start_proxy(self.port, self._target)

    def close(self) -> None:
        self.stop()
        stop_process(self._moto)


# ----------------------------------------------------------------------------- the forwarder


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, both: tuple) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other way may still be sending
    except OSError:  # reset or broken: cut both ways
        for w in both:
            w.close()


async def _forward(target_port: int, client_reader, client_writer) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(HOST, target_port)
    except OSError:
        client_writer.close()
        return
    both = (client_writer, server_writer)
    try:
        await asyncio.gather(_pipe(client_reader, server_writer, both), _pipe(server_reader, client_writer, both),
                             return_exceptions=True)
    finally:
        for writer in both:
            writer.close()


async def _serve(listen_port: int, target_port: int) -> None:
    deadline = time.monotonic() + 30
    while True:  # the port was just freed by the forwarder before this one; retry a moment if it is not yet free
        try:
            server = await asyncio.start_server(lambda r, w: _forward(target_port, r, w), HOST, listen_port,
                                                reuse_address=True)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    async with server:
        await server.serve_forever()


def _exit_with_parent() -> None:
    """A daemon thread that ends this process once the process that started it is gone (re-parented)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


if __name__ == "__main__":
    _exit_with_parent()
    if sys.argv[1:2] == ["moto"]:
        from moto.server import main

        main(sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "proxy":
        asyncio.run(_serve(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(f"usage: {sys.argv[0]} moto [moto.server options] | proxy LISTEN_PORT TARGET_PORT")
