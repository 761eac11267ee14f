"""Time the full synthetic sweep (Figure 2: 3 scenarios × 6 methods × 20 seeds at the paper's
10k / 5k / 20k iterations) batched over seeds, against the same code one seed at a time.

    python -m benchmarks.synthetic [--json PATH] [--repeats 3] [--dtype float64|float32]
                                   [--workers 2]

Runs alternate (batched with --workers processes, batched in one process, one-at-a-time, …) so
drifting machine load hits all alike; the table reports medians of wall-clock and CPU seconds
(this process plus its worker processes) and the wall-clock ratio. The load average is printed
too: on a shared machine CPU seconds are the steadier number.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from benchmarks._common import machine_info, median
from grpo.io import write_json


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its finished child processes (the workers)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _time(cfg, one_seed_at_a_time: bool) -> tuple[float, float]:
    from grpo.synthetic.runner import run_sweep

    cpu = _cpu_seconds()
    wall = time.perf_counter()
    run_sweep(cfg, one_seed_at_a_time=one_seed_at_a_time)
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m benchmarks.synthetic --json outputs/bench/synthetic.json\n"
        "  python -m benchmarks.synthetic --repeats 1 --seeds 5\n"
        "  python -m benchmarks.synthetic --workers 1 --dtype float32\n",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds (default 20, the paper's)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes of the first mode (default 2)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.seeds < 1 or args.workers < 1:
        parser.error("--repeats, --seeds and --workers must be >= 1")

    from grpo.synthetic.runner import SyntheticConfig

    cfgs = {
        f"batched, {args.workers} processes": SyntheticConfig(
            seeds=args.seeds, dtype=args.dtype, workers=args.workers
        ),
        "batched, 1 process": SyntheticConfig(seeds=args.seeds, dtype=args.dtype, workers=1),
        "one seed at a time": SyntheticConfig(seeds=args.seeds, dtype=args.dtype, workers=1),
    }
    _time(SyntheticConfig(seeds=2, iterations=50), False)  # warm-up: imports, allocator, fork
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in cfgs}
    loads = []
    for i in range(args.repeats):
        for mode, cfg in cfgs.items():
            times[mode].append(_time(cfg, mode == "one seed at a time"))
            loads.append(os.getloadavg()[0])
            wall, cpu = times[mode][-1]
            print(
                f"  run {i + 1}/{args.repeats} {mode}: {wall:.2f} s wall, {cpu:.2f} s CPU",
                file=sys.stderr,
            )
    rows = {
        mode: {"wall_s": median([w for w, _ in v]), "cpu_s": median([c for _, c in v]), "runs": v}
        for mode, v in times.items()
    }
    ratio = rows["one seed at a time"]["wall_s"] / rows["batched, 1 process"]["wall_s"]
    cpu_ratio = rows["one seed at a time"]["cpu_s"] / rows["batched, 1 process"]["cpu_s"]
    info = machine_info()
    print(
        f"synthetic sweep: 3 scenarios x 6 methods x {args.seeds} seeds, paper iterations, "
        f"{args.dtype}, medians of {args.repeats}"
    )
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, load average during runs "
        f"{min(loads):.1f}-{max(loads):.1f}"
    )
    print("| mode | wall s | CPU s |")
    print("|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |")
    print(f"speed-up of batching (1 process): {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU")
    if args.json:
        write_json(
            args.json,
            {
                "seeds": args.seeds,
                "dtype": args.dtype,
                "repeats": args.repeats,
                "workers": args.workers,
                "modes": rows,
                "speedup_wall": ratio,
                "speedup_cpu": cpu_ratio,
                "loadavg_during": [min(loads), max(loads)],
                "machine": info,
            },
            sort_keys=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
