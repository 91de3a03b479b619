"""A live ``python -m pycrcnn.server`` (gunicorn) for the benches: start,
stop, its worker processes and their memory, the machine's load."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]


def start_server(models_dir: Path, log_path: Path, *extra: str, timeout: float = 120.0,
                 launcher: Tuple[str, ...] = ("-m", "pycrcnn.server")) -> Tuple[subprocess.Popen, str]:
    """``python -m pycrcnn.server`` (or ``python *launcher``) on a free port of
    127.0.0.1: ``(process, base URL)``. The benches and the tests' fixtures
    (``tests/conftest.py``) start their servers here."""
    import requests

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *launcher, "--models", str(models_dir), "--host",
                                 "127.0.0.1", "--port", "0", *extra], stdout=subprocess.PIPE, stderr=log, env=env,
                                cwd=str(ROOT))
    deadline = time.monotonic() + timeout
    line = b""
    while b"\n" not in line and proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    match = re.search(r"listening on (http://[\d.]+:\d+)", line.decode("utf-8", "replace"))
    if not match:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}\n{Path(log_path).read_text(errors='replace')}")
    url = match.group(1)
    while True:
        try:
            if requests.get(url + "/", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server at {url} does not answer\n{Path(log_path).read_text(errors='replace')}")
        time.sleep(0.1)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def worker_pids(master_pid: int) -> List[int]:
    """The pids of the master's children (gunicorn's workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master_pid:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_for_workers(master_pid: int, n: int, timeout: float = 60.0, exclude=()) -> List[int]:
    """The master's ``n`` workers, none of them in ``exclude`` (waits for replacements)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in worker_pids(master_pid) if p not in exclude]
        if len(pids) == n:
            return pids
        time.sleep(0.2)
    raise RuntimeError(f"expected {n} workers of {master_pid}, have {worker_pids(master_pid)}")


def memory_kb(pid: int) -> Tuple[int, int]:
    """(VmRSS, VmHWM: the peak RSS) of a process in KiB; (0, 0) once it is gone."""
    cur = peak = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    except OSError:
        pass
    return cur, peak


class MemorySampler:
    """Samples the RSS of a server's master and workers every ``period``
    seconds in a thread: the peak per process (VmHWM) and the peak of their sum."""

    def __init__(self, master_pid: int, period: float = 0.5):
        self.master_pid = master_pid
        self.period = period
        self.peak_kb: Dict[int, int] = {}
        self.peak_total_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        total = 0
        for pid in [self.master_pid, *worker_pids(self.master_pid)]:
            cur, peak = memory_kb(pid)
            total += cur
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), peak)
        self.peak_total_kb = max(self.peak_total_kb, total)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def workers_kb(self) -> Dict[int, int]:
        return {pid: kb for pid, kb in self.peak_kb.items() if pid != self.master_pid}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    import platform

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}"
