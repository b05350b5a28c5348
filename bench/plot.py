"""PNG of a benchmark run: per op, ours' speedup over each alternative, per case, with ours' % of peak.

Imported only for ``python -m bench --plot PATH``; needs matplotlib (not a dependency of the package).
"""
from typing import Dict, List

CASE_KEYS = ("shape", "layout", "activation", "mode", "pass_")


def _case_label(row: dict) -> str:
    return " ".join(str(row[k]) for k in CASE_KEYS if row.get(k) not in (None, ""))


def write_png(path: str, results: Dict[str, List[dict]], meta: dict) -> None:
    """One horizontal bar chart per op: for every case (shape, variant, pass), one bar per alternative
    provider = alternative's median / ours (> 1: ours is faster; log scale), and ours' achieved
    throughput as a percentage of the measured device peak written beside the group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for op, rows in results.items():
        # Attention rows carry CUDA-graph speedups (GPU time alone) beside the eager ones: plot those.
        key = "graph_speedup_vs" if any(r.get("graph_speedup_vs") for r in rows) else "speedup_vs"
        cases = [r for r in rows if r.get(key)]
        panels.append((op, cases, key))
    heights = [max(2.0, 0.22 * sum(len(r[key]) + 1 for r in cases) + 1.2) for _, cases, key in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) or 3),
                             gridspec_kw=dict(height_ratios=heights or [1]), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette: Dict[str, str] = {}
    for ax, (op, cases, key) in zip(axes[:, 0], panels):
        if not cases:
            ax.text(0.5, 0.5, f"{op}: no case with both ours and an alternative", ha="center", va="center")
            ax.set_axis_off()
            continue
        y, ticks, labels, seen = 0.0, [], [], set()
        values = [v for r in cases for v in r[key].values()]
        top, bottom = max(max(values), 1.0), min(min(values), 1.0)
        for row in cases:
            start = y
            for provider, value in sorted(row[key].items()):
                color = palette.setdefault(provider, colors[len(palette) % len(colors)])
                ax.barh(y, value, height=0.8, color=color, label=None if provider in seen else provider)
                seen.add(provider)
                y += 1
            ticks.append((start + y - 1) / 2)
            labels.append(_case_label(row))
            pct = row.get("pct_peak")
            ms = row["graph_ms"] if key == "graph_speedup_vs" else row["ms"]
            note = f"{ms:.3g} ms" + (f", {pct:.0f}% of peak" if pct is not None else "")
            ax.text(top * 1.15, (start + y - 1) / 2, note, va="center", fontsize=7)
            y += 1  # gap between cases
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(bottom / 1.5, top * 6)
        timing = "CUDA-graph" if key == "graph_speedup_vs" else "median"
        ax.set_xlabel(f"alternative's {timing} time / ours (> 1: ours faster, log scale)")
        peak = "matmul" if op == "target_attention" else "copy bandwidth"
        ax.set_title(f"{op}: speedup over each alternative; right: ours' median ms and % of measured "
                     f"{peak} peak", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="alternative",
                  title_fontsize=7)
    title = (f"gesr_kernels benchmark, {meta.get('device')}, torch {meta.get('torch')}, "
             f"Triton {meta.get('triton')}, commit {meta.get('commit')}, suite {meta.get('suite')}")
    if not meta.get("cuda"):
        title += "\nCPU run through the Triton interpreter: these ratios say nothing about GPU speed"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # leave the top strip to the title
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    """``python -m bench.plot OUT.png RUN.json [RUN.json ...]``: one PNG from saved ``--json`` runs (rows of
    the same op are concatenated, e.g. suites run one at a time); the title lists every suite and commit."""
    import json
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not args[0].endswith(".png"):
        print(main.__doc__, file=sys.stderr)
        return 2
    results: Dict[str, List[dict]] = {}
    meta: dict = {}
    for path in args[1:]:
        with open(path) as f:
            run = json.load(f)
        for op, rows in run["results"].items():
            results.setdefault(op, []).extend(rows)
        commits = [c for c in (meta.get("commit") or "").split(" + ") if c]
        commits += [run["meta"].get("commit")] if run["meta"].get("commit") not in commits else []
        meta = dict(run["meta"], suite=" + ".join(filter(None, [meta.get("suite"), run["meta"].get("suite")])),
                    commit=" + ".join(filter(None, commits)))
    write_png(args[0], results, meta)
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
