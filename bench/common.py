"""Timing, device facts, progress and table printing shared by the benchmarks."""
import os
import platform
import subprocess
import sys
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch


def device_info() -> dict:
    import triton
    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            info["driver"] = out.splitlines()[0] if out else "unknown"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
                    driver="none (no CUDA)")
    info["commit"] = git_commit()
    return info


def git_commit() -> str:
    """Short commit of the checkout holding this package, with "-dirty" when tracked files changed."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=here).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Timing(NamedTuple):
    """Milliseconds: 20th percentile, median, 80th percentile of the timed repetitions."""
    p20: float
    median: float
    p80: float


QUANTILES = [0.2, 0.5, 0.8]


def gpu_timing(fn: Callable[[], object], *, warmup_ms: float = 50, rep_ms: float = 300) -> Timing:
    """p20 / median / p80 GPU time of ``fn`` (triton.testing.do_bench: warm-up first, L2 flushed before
    every repetition, CUDA events)."""
    import triton.testing
    return Timing(*triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES))


def graph_timing(fn: Callable[[], object], *, rep_ms: float = 300, calls_per_graph: int = 10) -> Timing:
    """p20 / median / p80 GPU time of one call of ``fn``, replayed from a CUDA graph: no host launch
    overhead. ``fn`` may run an autograd backward: it is warmed up on a side stream first, as CUDA-graph
    capture of autograd requires, and ``calls_per_graph`` calls are captured into one graph so that the
    replay's own launch cost is spread over them."""
    import torch
    import triton.testing
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    times = triton.testing.do_bench(graph.replay, rep=rep_ms, quantiles=QUANTILES)
    return Timing(*(t / calls_per_graph for t in times))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def cpu_timing(fn: Callable[[], object], *, repeat: int = 3) -> Timing:
    """Wall-clock p20 / median / p80 of ``fn`` on the host after one warm-up call (CPU runs only)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return Timing(*(_quantile(times, q) for q in QUANTILES))


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Device memory allocated by one call of ``fn`` above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 1e6


def measured_bandwidth_gbs(size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = gpu_timing(lambda: dst.copy_(src)).median
    return 2 * size_bytes / ms / 1e6


def measured_matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = gpu_timing(lambda: a @ b).median
    return 2 * n ** 3 / ms / 1e9


def format_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float)
                                            else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_rows(rows: List[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """Markdown table of dict rows; missing values print as empty cells."""
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)
    return format_table(headers or columns, [[cell(r.get(c)) for c in columns] for r in rows])


def add_speedups(rows: List[dict], group_keys: Sequence[str], ours: str, *, time_key: str = "ms",
                 speedup_key: str = "speedup") -> None:
    """Fill ``speedup_key`` in place within each group of rows sharing ``group_keys``, from the times in
    ``time_key`` (the eager medians by default, e.g. ``graph_ms`` for CUDA-graph replays).

    On an alternative's row: its time / ours (> 1: ours is faster than that alternative). On ours' row:
    the fastest alternative's time / ours, and ``<speedup_key>_vs`` = {alternative: its time / ours}.
    """
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    for group in groups.values():
        mine = next((r for r in group if r["provider"] == ours and r.get(time_key)), None)
        if mine is None:
            continue
        others = {r["provider"]: r[time_key] for r in group if r["provider"] != ours and r.get(time_key)}
        for r in group:
            if r is not mine and r.get(time_key):
                r[speedup_key] = r[time_key] / mine[time_key]
        if others:
            mine[speedup_key] = min(others.values()) / mine[time_key]
            mine[speedup_key + "_vs"] = {name: t / mine[time_key] for name, t in others.items()}


class Progress:
    """Progress on stderr: a tqdm bar when tqdm is importable and stderr is a terminal, else one line per
    step. Never a hard dependency; ``enabled=False`` keeps it silent."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled, self.done = total, label, enabled and total > 0, 0
        self.start = time.perf_counter()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def step(self, what: str) -> None:
        """Announce the step about to run."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60], refresh=False)
            if self.done:
                self.bar.update(1)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.label} {self.done + 1}/{self.total}, {elapsed:.0f}s] {what}", file=sys.stderr,
                  flush=True)
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(max(self.done - self.bar.n, 0))
            self.bar.close()


def benchmark_synced(benchmark, fn: Callable[[], object], **extra) -> None:
    """pytest-benchmark helper: time ``fn`` followed by ``torch.cuda.synchronize()`` (so each round
    measures finished GPU work, not a queued launch), and record the do_bench p20/median/p80 of ``fn``
    plus ``extra`` (throughput, shape, dtype, versions) in ``benchmark.extra_info``.

    ``benchmark.stats`` is None under ``--benchmark-disable``: then ``fn`` runs once, untimed by do_bench.
    """
    import triton
    fn()  # compile, autotune and allocate before anything is timed
    torch.cuda.synchronize()
    info = benchmark.extra_info
    info.update(extra)
    info.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit())
    if getattr(benchmark, "enabled", True):
        timing = gpu_timing(fn, warmup_ms=25, rep_ms=100)
        info.update(do_bench_p20_ms=timing.p20, do_bench_median_ms=timing.median, do_bench_p80_ms=timing.p80)
        for key, per_ms in list(extra.items()):  # "<unit>_per_call" -> "<unit>_per_s" at the median
            if key.endswith("_per_call") and isinstance(per_ms, (int, float)):
                info[key[:-len("_per_call")] + "_per_s_at_median"] = per_ms / (timing.median * 1e-3)

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark(synced)
    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats is not None else None
    if stats is not None:
        info["pytest_benchmark_median_ms"] = stats.median * 1e3
