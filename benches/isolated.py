"""The isolated runner of :mod:`hostile`: cases run in worker processes, so
that a loader that aborts or segfaults is counted as a ``crash`` of its case
and one silent for the time limit as a ``hang``, and the run goes on."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from hostile import Case, Material, load_case, make_case

HERE = Path(__file__).resolve().parent


def _rss_kb() -> Tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB."""
    cur = peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1])
    return cur, peak


def worker_main(folder: str, seed: int) -> None:
    """``python isolated.py worker FOLDER SEED``: reads ``start stop`` lines,
    answers one ``index outcome`` line per case, and ``rss cur peak`` after
    each range."""
    from pycrcnn import set_num_threads

    set_num_threads(1)
    material = Material.load(Path(folder))
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    # the runner's own check (tests/test_robustness.py): a case that aborts, one that hangs
    abort_at = int(os.environ.get("HOSTILE_SELFTEST_ABORT", "-1"))
    hang_at = int(os.environ.get("HOSTILE_SELFTEST_HANG", "-1"))
    for line in sys.stdin:
        start, stop = map(int, line.split())
        for i in range(start, stop):
            if i == abort_at:
                os.abort()
            if i == hang_at:
                time.sleep(3600)
            case = make_case(material, seed, i)
            outcome = load_case(material, case)
            out.write(f"{i} {outcome} {case.loader} {int(case.forged)} {case.mutation}\n")
            out.flush()
        cur, peak = _rss_kb()
        out.write(f"rss {cur} {peak}\n")
        out.flush()


@dataclass
class RunResult:
    counts: Counter = field(default_factory=Counter)
    by_loader: Dict[str, Counter] = field(default_factory=dict)
    by_forged: Dict[bool, Counter] = field(default_factory=dict)
    failures: List[Tuple[int, str, str, str, bool]] = field(default_factory=list)
    worker_rss_kb: List[Tuple[int, int, int]] = field(default_factory=list)  # (cases done, cur, peak)
    seconds: float = 0.0
    n: int = 0

    BAD = ("panic", "unexpected", "crash", "hang")

    def bad(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith(self.BAD))


class _Worker:
    """One loader process; lines are read from its pipe unbuffered (a
    buffered reader would hold lines that ``select`` no longer sees)."""

    def __init__(self, folder: Path, seed: int):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "isolated.py"), "worker", str(folder), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""
        line = self._readline(120)
        if line != "ready":
            self.kill()
            raise RuntimeError(f"a hostile-blob worker did not start: {line!r}")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def _readline(self, timeout: float) -> Optional[str]:
        """The next line; None after ``timeout`` seconds without one, "" at EOF."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return ""
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


def run_cases(folder: Path, seed: int, start: int, stop: int, workers: int = 2, chunk: int = 500,
              time_limit: float = 20.0, progress: Optional[Callable[[int], None]] = None,
              describe: Optional[Callable[[int], Case]] = None) -> RunResult:
    """Runs cases ``[start, stop)`` in ``workers`` isolated processes. A
    worker that dies is counted as a ``crash`` of the case it was on, one
    silent for ``time_limit`` seconds as a ``hang``; it is replaced and the
    range goes on after that case."""
    import threading

    result = RunResult(n=stop - start)
    lock = threading.Lock()
    todo = [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]
    t0 = time.perf_counter()

    def record(i: int, outcome: str, loader: str = "?", forged: Optional[bool] = None, mutation: str = "?") -> None:
        kind = outcome.split(":")[0] if outcome.startswith("crash") else outcome
        if loader == "?" and describe is not None:
            c = describe(i)
            loader, mutation = c.loader, c.mutation
        forged = i % 2 == 1
        with lock:
            result.counts[kind] += 1
            result.by_loader.setdefault(loader, Counter())[kind] += 1
            result.by_forged.setdefault(forged, Counter())[kind] += 1
            if kind.startswith(RunResult.BAD):
                result.failures.append((i, outcome, loader, mutation, forged))
            if progress:
                progress(1)

    def serve() -> None:
        w = _Worker(folder, seed)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    a, b = todo.pop(0)
                w.send(f"{a} {b}\n")
                nxt = a
                while nxt < b:
                    line = w._readline(time_limit)
                    if line is None or line == "":
                        code = w.proc.poll()
                        if line is None:
                            outcome = "hang"
                        else:
                            w.proc.wait()
                            code = w.proc.returncode
                            outcome = f"crash:{'signal ' + str(-code) if code and code < 0 else code}"
                        w.kill()
                        record(nxt, outcome)
                        nxt += 1
                        w = _Worker(folder, seed)
                        if nxt < b:
                            w.send(f"{nxt} {b}\n")
                        continue
                    i, outcome, loader, forged, mutation = line.split(" ")
                    record(int(i), outcome, loader, forged == "1", mutation)
                    nxt = int(i) + 1
                line = w._readline(time_limit)
                if line and line.startswith("rss "):
                    _, cur, peak = line.split()
                    with lock:
                        done = sum(result.counts.values())
                        result.worker_rss_kb.append((done, int(cur), int(peak)))
        finally:
            w.close()

    threads = [threading.Thread(target=serve) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker_main(sys.argv[2], int(sys.argv[3]))
    else:
        print("usage: isolated.py worker FOLDER SEED (started by benches/robustness.py)", file=sys.stderr)
        sys.exit(2)
