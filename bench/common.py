"""Timing, device facts and table printing shared by the benchmarks."""
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Sequence

import torch


def device_info() -> dict:
    import triton
    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    return info


def gpu_time_ms(fn: Callable[[], object], *, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median GPU time of ``fn`` in ms (triton.testing.do_bench: warm-up first, CUDA events)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graph_time_ms(fn: Callable[[], object]) -> float:
    """Median time of a CUDA-graph replay of ``fn`` in ms: GPU time without host launch overhead."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")


def cpu_time_ms(fn: Callable[[], object], *, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * size_bytes / ms / 1e6


def measured_matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = gpu_time_ms(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


def format_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float)
                                            else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
