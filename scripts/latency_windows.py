#!/usr/bin/env python3
# Usage:
#   python3 scripts/latency_windows.py [--ramp-s 1.1] [--under-ms 10] FILE...
# FILE: what `loadgen --latencies FILE` wrote, one `unix_seconds,micros` line per result ->
# next dispatch. For each file: the p99 over the whole run, before `--ramp-s` seconds from its
# first sample (while sessions still start) and after; then, over all files, the median of
# those p99s and how many runs were under `--under-ms`. This is how docs/benchmarks.md splits
# a run's tail into its ramp and the rest, and pools a day's runs.
import argparse
import statistics
import sys


def p99(micros):
    if not micros:
        return float("nan")
    ordered = sorted(micros)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000


def read(path):
    samples = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            try:
                at, micros = line.strip().split(",")
                samples.append((float(at), int(micros)))
            except ValueError:
                sys.exit(f"{path}:{number}: not `unix_seconds,micros`: {line.strip()!r}")
    return samples


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ramp-s", type=float, default=1.1)
    parser.add_argument("--under-ms", type=float, default=10.0)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    runs = {"all": [], "ramp": [], "after": []}
    print("file\tp99 ms\tramp\tafter")
    for path in args.files:
        samples = read(path)
        if not samples:
            print(f"{path}\tno samples")
            continue
        start = min(at for at, _ in samples)
        split = {
            "all": [us for _, us in samples],
            "ramp": [us for at, us in samples if at - start < args.ramp_s],
            "after": [us for at, us in samples if at - start >= args.ramp_s],
        }
        for part, micros in split.items():
            runs[part].append(p99(micros))
        print(f"{path}\t{runs['all'][-1]:.1f}\t{runs['ramp'][-1]:.1f}\t{runs['after'][-1]:.1f}")
    if runs["all"]:
        medians = {part: statistics.median(values) for part, values in runs.items()}
        under = sum(value < args.under_ms for value in runs["all"])
        print(
            f"median of {len(runs['all'])} runs\t{medians['all']:.1f}\t{medians['ramp']:.1f}"
            f"\t{medians['after']:.1f}\t({under} under {args.under_ms:g} ms)"
        )


if __name__ == "__main__":
    main()
