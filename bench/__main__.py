"""``python -m bench``: run the gesr_kernels benchmarks and print one table per op.

Every provider of an op runs side by side in the same process; each table gives the median ms and the
p20/p80 of the timed repetitions (``triton.testing.do_bench``), the speedup of ours over each alternative
(on an alternative's row: its median / ours; on ours' row: the fastest alternative's / ours), and the
achieved throughput as a percentage of this device's peak measured in the same run: HMA in GB/s against a
large device-to-device copy, attention in TFLOP/s against a large bf16 matmul.

Suites (``--suite``):
  serving   HMA: the shapes with many candidates per user (n >= 64), forward (eager and CUDA graph);
            attention: uniform batches, forward, full and cached (history K/V given) mode.
  training  HMA: every shape, forward+backward; attention: uniform batches, forward+backward.
  jagged    attention: the jagged layouts (ragged histories and candidate counts), every pass and mode;
            HMA has no jagged rows (its PyTorch compositions need uniform batches).
  all       everything above (the default).
``--quick`` keeps two shapes per op and drops the slow naive attention provider.

``--json PATH`` writes every row with the device, driver, torch, Triton and git commit; ``--plot PATH``
writes a PNG (needs matplotlib). Progress goes to stderr (``--no-progress`` silences it).

Without CUDA it runs a short, clearly labelled CPU check instead (kernels through the Triton interpreter at
small shapes, compared with the references, reference timings beside them) and exits 0.
"""
import argparse
import datetime
import json
import math
import os
import sys

SUITE_CHOICES = ["serving", "training", "jagged", "all"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["hma", "attention", "all"], default="all", help="which op to benchmark")
    parser.add_argument("--suite", choices=SUITE_CHOICES, default="all",
                        help="named set of shapes and passes (default: all)")
    parser.add_argument("--quick", action="store_true", help="two shapes per op, no naive attention provider")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speedups (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser


def _clean(value):
    """JSON-safe copy: non-finite floats become null, tuples lists, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _check_output_path(parser, option: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{option}: folder {folder} does not exist")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for option in ("json", "plot"):
        if getattr(args, option):
            _check_output_path(parser, "--" + option, getattr(args, option))
    if args.plot:  # fail before a long run, not after it
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:  # imported only when the PNG is drawn
            print("python -m bench: --plot needs matplotlib, which is not installed "
                  "(pip install matplotlib), or leave out --plot.", file=sys.stderr)
            return 2

    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    from . import hard_match
    from .common import device_info, measured_bandwidth_gbs, measured_matmul_tflops

    info = device_info()
    progress = not args.no_progress
    print("gesr_kernels benchmark: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"suite {args.suite}{' (quick)' if args.quick else ''}")
    peaks = {}
    if cuda:
        print("measuring this device's peaks (8192^3 bf16 matmul, 1 GiB device-to-device copy) ...",
              file=sys.stderr, flush=True)
        peaks = dict(matmul_tflops=measured_matmul_tflops(), copy_gbs=measured_bandwidth_gbs())
        print(f"measured peaks: bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, "
              f"copy {peaks['copy_gbs']:.0f} GB/s (read+write)")
    else:
        print("\nNo CUDA device: CPU run. The Triton kernels run through the interpreter on small shapes and "
              "are checked against the PyTorch references; CPU timings say nothing about GPU speed.")

    results, notes = {}, {}
    if args.op in ("hma", "all"):
        rows, note = hard_match.run(quick=args.quick, suite=args.suite, peaks=peaks, progress=progress)
        results["hard_match_embedding"], notes["hard_match_embedding"] = rows, note
        print("\n## hard_match_embedding" + ("" if cuda else " (CPU, fp32)"))
        if rows:
            print(hard_match.format_table(rows) if cuda else hard_match.format_cpu_table(rows))
        print(note)
    if args.op in ("attention", "all"):
        from . import target_attention
        rows = target_attention.run(quick=args.quick, suite=args.suite, peaks=peaks, progress=progress)
        results["target_attention"] = rows
        notes["target_attention"] = ("speedup: on an alternative's row its median / ours; on ours' row the "
                                     "fastest alternative's / ours. See bench/target_attention.py for the "
                                     "providers and the FLOP count.")
        print("\n## target_aware_attention" + ("" if cuda else " (CPU, fp32)"))
        print(target_attention.format_table(rows))

    meta = dict(info, peaks=peaks, op=args.op, suite=args.suite, quick=args.quick, cuda=cuda,
                utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m bench " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_clean(dict(meta=meta, notes=notes, results=results)), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        from .plot import write_png
        write_png(args.plot, results, meta)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
