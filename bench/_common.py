"""Shared helpers of the benchmark scripts (not part of the package).

Machine facts, the real PBC images, a loopback moto S3 server run as a separate
process (as ``tests/conftest.py`` runs it), JSON + markdown result files, and the cells the model-quality
benches score (PBC splits, chula_wbc, decoding, prediction, scores, Reinhard statistics). Bench scripts share
code through this module only, never by importing one another.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PBC = Path(os.environ.get("BLOODRAY_PBC", "/work/shared/data/pbc"))

# Fake credentials for the loopback server only, set before Ray starts so its
# workers inherit them through the standard AWS chain (as in tests/conftest.py).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIABLOODRAYBENCHKEY")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bloodray-bench-secret-do-not-log")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pbc_images(n: int | None = None) -> list[Path]:
    """``n`` real PBC JPEGs, classes interleaved (deterministic): every subset has all classes."""
    per_class = [sorted((PBC / c).glob("*.jpg")) for c in sorted(p.name for p in PBC.iterdir() if p.is_dir())]
    per_class = [files for files in per_class if files]
    if not per_class:
        raise SystemExit(f"no PBC images under {PBC} (set BLOODRAY_PBC)")
    out: list[Path] = []
    i = 0
    while any(i < len(f) for f in per_class):
        out += [f[i] for f in per_class if i < len(f)]
        i += 1
    return out if n is None else out[:n]


def archive_layout(images: list[Path], per_sample: int = 100, copies: int = 1) -> list[tuple[str, Path]]:
    """(relative archive path, source image): ``S<k>/<name>.jpg``, ``per_sample`` cells per sample.

    ``copies`` > 1 repeats the images under distinct names (``c<j>-<name>``),
    for archives larger than the image set.
    """
    rows = []
    for j in range(copies):
        for img in images:
            k = len(rows)
            name = img.name if copies == 1 else f"c{j:03d}-{img.name}"
            rows.append((f"S{k // per_sample:05d}/{name}", img))
    return rows


def link_archive(root: Path, layout: list[tuple[str, Path]]) -> Path:
    """Materialise a local archive as symlinks to the real images (no copy of the data)."""
    for rel, src in layout:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.symlink_to(src)
        except OSError:
            dest.write_bytes(src.read_bytes())
    return root


def classify_config(archive: str, out: str, storage_options: dict, checkpoint: str | None, sets: list[str]):
    """The ClassifyConfig a user's `bloodray classify --set ...` would build for this archive."""
    from bloodray.nightly.pipeline import ClassifyConfig
    from bloodray.config import load_config

    overrides = [f"input.uri={archive}", f"output.uri={out}"]
    if storage_options.get("endpoint_url"):
        overrides.append(f"storage.endpoint_url={storage_options['endpoint_url']}")
    if checkpoint:
        overrides.append(f"model.checkpoint={checkpoint}")
    return load_config(ClassifyConfig, None, overrides + list(sets))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoS3:
    """moto's S3 server on 127.0.0.1 as a separate process (``python -m moto.server``), as ``tests/`` run it.

    Not in this process: deltalake commits the output table in Rust without releasing the GIL, and a server
    thread in this interpreter could not answer it (the commit would time out). Start with :meth:`start` or
    ``with MotoS3() as s3:``; :meth:`stop` (or leaving the ``with``) ends it. The server exits by itself if this
    process dies without stopping it. ``pid``: the server's process id, for :class:`TreeMonitor`'s ``exclude``.
    """

    # moto's main() after a thread that ends the server once its parent is gone (re-parented), as tests/helpers_s3.py.
    _CODE = ("import os, threading, time\n"
             "parent = os.getppid()\n"
             "def watch():\n"
             "    while os.getppid() == parent:\n"
             "        time.sleep(1)\n"
             "    os._exit(0)\n"
             "threading.Thread(target=watch, daemon=True).start()\n"
             "from moto.server import main\n"
             "main()\n")

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 60) -> "MotoS3":
        """Start the server (if not running) and wait until it accepts connections."""
        if self.proc is not None:
            return self
        self.proc = subprocess.Popen([sys.executable, "-c", self._CODE, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"moto server exited with code {code} before it was ready")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not accept connections within {timeout:.0f} s")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; the process is always reaped. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "MotoS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)

    def upload(self, bucket: str, prefix: str, layout: list[tuple[str, Path]]) -> str:
        """Create ``bucket`` and upload the archive under ``prefix`` (parallel PUTs); returns its URI."""
        fs = self.filesystem()
        fs.mkdir(bucket)
        data = {f"{bucket}/{prefix}/{rel}": src.read_bytes() for rel, src in layout}
        fs.pipe(data, batch_size=64)
        fs.invalidate_cache()
        return f"s3://{bucket}/{prefix}"


def _psutil():
    """psutil, which Ray ships in ``ray/thirdparty_files`` (importing Ray puts it on the path)."""
    importlib.import_module("ray")
    import psutil

    return psutil


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _process_kind(proc) -> str:
    """Short name of a process of the job: Ray's process title (``ray::IDLE``, ``ray::MapWorker(...)``)
    or the executable's name."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001
        return "other"
    if not cmd:
        return "other"
    first = cmd[0]
    if first.startswith("ray::"):
        return first.split(" ")[0][:80]
    name = Path(first).name
    if name.startswith("python") and len(cmd) > 1:
        script = next((Path(a).name for a in cmd[1:] if a.endswith(".py")), None)
        return f"python {script}" if script else name
    return name


class TreeMonitor(threading.Thread):
    """CPU time and peak memory of this process and all its descendants, sampled in a background thread.

    With a local Ray cluster started by this process (``ray.init(address="local")``)
    the tree is the whole job: driver, GCS, raylet, workers and actors. CPU:
    the last CPU time seen of every process that was in the tree (minus what a
    process had used before the monitor started), so processes that exit
    during the run still count, up to their last sample. Memory: the peak of
    the summed RSS and of the summed PSS (shared pages such as torch's
    libraries and Ray's object store counted once), the driver's peak RSS and
    the largest single process. ``exclude``: pids left out (e.g. a test server).
    """

    def __init__(self, interval: float = 0.1, exclude: set[int] | None = None, memory: bool = True):
        super().__init__(daemon=True)
        self.interval, self.exclude, self.memory = interval, set(exclude or ()), memory
        self._procs: dict[tuple[int, float], Any] = {}
        self._cpu_first: dict[tuple[int, float], float] = {}
        self._cpu_last: dict[tuple[int, float], float] = {}
        self._kind: dict[tuple[int, float], str] = {}
        self.peak_rss = self.peak_pss = self.peak_driver_rss = self.peak_process_rss = 0
        self.peak_processes = self.samples = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.sample(initial=True)

    def sample(self, initial: bool = False) -> None:
        psutil = _psutil()

        me = psutil.Process()
        try:
            procs = [me] + [p for p in me.children(recursive=True) if p.pid not in self.exclude]
        except psutil.Error:
            procs = [me]
        rss_total = pss_total = counted = 0
        with self._lock:
            for proc in procs:
                try:
                    key = (proc.pid, proc.create_time())
                    proc = self._procs.setdefault(key, proc)
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                    rss = proc.memory_info().rss if self.memory else 0
                except psutil.Error:
                    continue
                self._cpu_first.setdefault(key, cpu if initial else 0.0)
                self._cpu_last[key] = cpu
                if key not in self._kind or self._kind[key].startswith(("ray::IDLE", "python")):
                    self._kind[key] = "driver" if proc.pid == me.pid else _process_kind(proc)
                if self.memory:
                    counted += 1
                    pss = _pss_bytes(proc.pid)
                    rss_total += rss
                    pss_total += pss if pss is not None else rss
                    self.peak_process_rss = max(self.peak_process_rss, rss)
                    if proc.pid == me.pid:
                        self.peak_driver_rss = max(self.peak_driver_rss, rss)
            self.peak_rss = max(self.peak_rss, rss_total)
            self.peak_pss = max(self.peak_pss, pss_total)
            self.peak_processes = max(self.peak_processes, counted)
            self.samples += 1

    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree since the monitor was created (as of the last sample)."""
        with self._lock:
            return sum(self._cpu_last[k] - self._cpu_first[k] for k in self._cpu_last)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process (driver, gcs_server, raylet, ray::<actor or task>, ...);
        ``<kind> xN`` when N processes of that kind ran."""
        out: dict[str, float] = {}
        count: dict[str, int] = {}
        with self._lock:
            for key, last in self._cpu_last.items():
                kind = self._kind.get(key, "other")
                out[kind] = out.get(kind, 0.0) + last - self._cpu_first[key]
                count[kind] = count.get(kind, 0) + 1
        return {(k if count[k] == 1 else f"{k} x{count[k]}"): round(v, 2)
                for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self.sample()
        mib = 2**20
        out = {"cpu_seconds": self.cpu_seconds(), "cpu_seconds_by_process": self.cpu_by_kind(),
               "samples": self.samples}
        if self.memory:
            out.update(peak_rss_mib=self.peak_rss / mib, peak_pss_mib=self.peak_pss / mib,
                       peak_driver_rss_mib=self.peak_driver_rss / mib,
                       peak_single_process_rss_mib=self.peak_process_rss / mib, peak_processes=self.peak_processes)
        return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bloodray", "bench/inference.py",
                                "bench/scale.py", "bench/_common.py"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def machine_facts() -> dict[str, Any]:
    import numpy
    import torch

    try:
        import ray
        ray_version = ray.__version__
    except ImportError:  # a lent GPU machine has no Ray; the GPU-only benches run there without it
        ray_version = None

    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": mem_gib,
        "load_average_at_start": _load_average(),
        "python": platform.python_version(),
        "ray": ray_version,
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_facts() -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def save(name: str, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``bench/results/<name>.json`` and ``.md``; returns their paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A fresh machine dict: a bench that saves after every run must not keep its first "end" (or share it).
    result = {**result, "machine": {**result.get("machine", {}), "load_average_at_end": _load_average()}}
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md.write_text(markdown)
    return js, md


def facts_markdown(result: dict[str, Any]) -> str:
    m, r = result["machine"], result["run"]
    return (f"- command: `{r['command']}`\n- date: {r['date']}; git commit: `{r['git_commit']}`\n"
            f"- machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; "
            f"load average at start {m['load_average_at_start']}, at end "
            f"{m.get('load_average_at_end') or _load_average()}\n"
            f"- python {m['python']}, ray {m['ray']}, torch {m['torch']} "
            f"(default threads {m['torch_default_threads']})\n")


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- cells of the model-quality benches
# (bench/adapt.py, bench/stain_norm.py and bench/robust_model.py score models on PBC and chula_wbc cells)

CHULA = Path(os.environ.get("BLOODRAY_CHULA", "/work/shared/data/chula_wbc"))


def decode(files: list[Path], size: int) -> np.ndarray:
    from bloodray.data.preset import EvalPreset

    preset = EvalPreset(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return np.stack([preset.load(f.read_bytes()) for f in files])


def predict(model, images: np.ndarray, preset, bn_stats: str = "running", batch_size: int = 64) -> np.ndarray:
    """Predicted class per image. ``bn_stats='batch'``: BatchNorm uses each batch's own statistics, over batches
    of shuffled cells (a slide mixes classes; batches of one class would flatter or wreck the statistics)."""
    import contextlib

    import torch

    from bloodray.train.adapt import batch_statistics

    model.eval()
    order = np.random.default_rng(0).permutation(len(images)) if bn_stats == "batch" else np.arange(len(images))
    out = np.empty(len(images), dtype=np.int64)
    with torch.inference_mode(), (batch_statistics(model) if bn_stats == "batch" else contextlib.nullcontext()):
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = model(preset.normalize(images[idx])).argmax(1).numpy()
    return out


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from bloodray.evaluation.metrics import classification_metrics

    m = classification_metrics(y, pred)
    return {"accuracy": round(m["accuracy"], 4), "balanced_accuracy": round(m["balanced_accuracy"], 4),
            "macro_f1": round(m["macro_f1"], 4)}


@functools.lru_cache(maxsize=1)
def _pbc_split():
    """The split every bloodray run uses (fractions 0.7/0.1/0.2, seed 0); built once, it hashes every file."""
    from bloodray.data.labelled import build_split

    return build_split(str(PBC))


def pbc_split_rows(split: str = "test") -> tuple[list[tuple[str, int]], list]:
    """(uri, label) of one PBC split every bloodray run uses (fractions 0.7/0.1/0.2, seed 0): test by default."""
    table, dropped = _pbc_split()
    rows = [(u, int(lab)) for u, lab, s in zip(table.column("uri").to_pylist(), table.column("label").to_pylist(),
                                               table.column("split").to_pylist()) if s == split]
    return rows, dropped


def lab_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image channel means and standard deviations in L*a*b* (n x 3 each)."""
    import torch

    from bloodray.data.stain import rgb_to_lab

    lab = rgb_to_lab(torch.as_tensor(images).permute(0, 3, 1, 2).double() / 255.0)
    return lab.mean(dim=(2, 3)).numpy(), lab.std(dim=(2, 3), unbiased=False).numpy()


def reinhard(images: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray,
             source: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """uint8 NHWC images matched to the reference with bloodray's own transform (:mod:`bloodray.data.stain`):
    per image, or with one ``source`` (mean, std) for all (a lab-wide transform, which the library does not offer)."""
    import torch

    from bloodray.data.stain import StainReference, lab_to_rgb, reinhard as per_image, rgb_to_lab

    rgb = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    reference = StainReference(tuple(ref_mean), tuple(ref_std))
    if source is None:
        out = per_image(rgb, reference)
    else:
        mean, std = (torch.tensor(np.asarray(v), dtype=torch.float32).view(1, 3, 1, 1) for v in source)
        target_mean, target_std = (torch.tensor(np.asarray(v), dtype=torch.float32).view(1, 3, 1, 1)
                                   for v in (ref_mean, ref_std))
        out = lab_to_rgb((rgb_to_lab(rgb) - mean) / std * target_std + target_mean)
    return (out.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
