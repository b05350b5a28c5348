"""``python -m bench``: run the gesr_kernels benchmarks and print one table per op.

On a machine without CUDA it runs a short, clearly labelled CPU check instead (kernels through the
Triton interpreter, compared with the references), and exits 0.
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["hma", "attention", "all"], default="all", help="which op to benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    from . import hard_match
    from .common import device_info

    info = device_info()
    print("gesr_kernels benchmark: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if not torch.cuda.is_available():
        print("\nNo CUDA device: CPU run. The Triton kernels run through the interpreter on small shapes and "
              "are checked against the PyTorch references; CPU timings say nothing about GPU speed.\n")
    if args.op in ("hma", "all"):
        if torch.cuda.is_available():
            table, notes, _ = hard_match.run_gpu(quick=args.quick)
            print("\n## hard_match_embedding")
            print(table)
            print(notes)
        else:
            print("## hard_match_embedding (CPU, fp32)")
            print(hard_match.run_cpu())
    if args.op in ("attention", "all"):
        from . import target_attention
        print("\n## target_aware_attention" + ("" if torch.cuda.is_available() else " (CPU, fp32)"))
        print(target_attention.format_table(target_attention.run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
