"""Time the full synthetic sweep (Figure 2: 3 scenarios × 6 methods × 20 seeds at the paper's
10k / 5k / 20k iterations) batched over seeds, against the same code one seed at a time.

    python -m benchmarks.synthetic [--json PATH] [--repeats 3] [--dtype float64|float32]

Runs alternate (batched, one-at-a-time, batched, …) so drifting machine load hits both alike;
the table reports medians of wall-clock and process CPU seconds and the wall-clock ratio. The
load average is printed too: on a shared machine CPU seconds are the steadier number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks._common import machine_info, median, write_json


def _time(cfg, one_seed_at_a_time: bool) -> tuple[float, float]:
    from grpo.synthetic.runner import run_sweep

    cpu = time.process_time()
    wall = time.perf_counter()
    run_sweep(cfg, one_seed_at_a_time=one_seed_at_a_time)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m benchmarks.synthetic --json outputs/bench/synthetic.json\n"
        "  python -m benchmarks.synthetic --repeats 1 --seeds 5\n",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds (default 20, the paper's)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.seeds < 1:
        parser.error("--repeats and --seeds must be >= 1")

    from grpo.synthetic.runner import SyntheticConfig

    cfg = SyntheticConfig(seeds=args.seeds, dtype=args.dtype)
    _time(SyntheticConfig(seeds=1, iterations=50), False)  # warm-up: imports, allocator
    times: dict[str, list[tuple[float, float]]] = {"batched": [], "one seed at a time": []}
    loads = []
    for i in range(args.repeats):
        for mode in times:
            times[mode].append(_time(cfg, mode != "batched"))
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
    ratio = rows["one seed at a time"]["wall_s"] / rows["batched"]["wall_s"]
    cpu_ratio = rows["one seed at a time"]["cpu_s"] / rows["batched"]["cpu_s"]
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
    print(f"speed-up of batching: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU")
    if args.json:
        write_json(
            args.json,
            {
                "seeds": args.seeds,
                "dtype": args.dtype,
                "repeats": args.repeats,
                "modes": rows,
                "speedup_wall": ratio,
                "speedup_cpu": cpu_ratio,
                "loadavg_during": [min(loads), max(loads)],
                "machine": info,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
