#!/usr/bin/env python3
"""The README's benchmark table: moa_bench at one thread, two threads and bf16, medians of rounds.

    python3 bench/benchmark_table.py [--moa-bench build/bench/bench/moa_bench] [--repetitions 3]

Runs moa_bench over the table's benchmarks with --threads=1, --threads=2 and --precision=bf16 in
turn, and does so `--repetitions` rounds: the three runs alternate, so that on a shared host whose
speed drifts over minutes each column samples the same stretches of time, and a speedup compares
runs made minutes apart at most. Prints the table in Markdown: time, GFLOP/s, %best and tokens/s at
one thread (the round with the median time), then the 2-thread time (its speedup) and the bf16 time
(its speedup), medians over the rounds. Not part of the tests.
"""
import argparse
import json
import os
import subprocess
import sys

SHAPES = [("toy", "(32, 32, 256, 8, 2, 64)"), ("base", "(8, 128, 512, 8, 8, 128)"),
          ("wide8", "(8, 128, 512, 8, 4, 64)"), ("wide", "(8, 128, 512, 32, 4, 64)"),
          ("wide64", "(8, 128, 512, 64, 4, 64)"), ("causal", "(8, 256, 512, 16, 4, 64)"), ("noncausal", None)]

# (benchmark, label, show 2 threads, show bf16)
ROWS = [("BM_Sgemm/1024", "Eigen SGEMM 1024³", True, False),
        ("BM_SgemmOpenBLAS/1024", "OpenBLAS SGEMM 1024³", True, False),
        ("BM_Sgemm/256x64x512", "Eigen SGEMM 256×64×512 (per-expert shape)", True, False),
        ("BM_SgemmOpenBLAS/256x64x512", "OpenBLAS SGEMM 256×64×512", True, False),
        ("BM_SgemmOneDNN/1024", "oneDNN f32 1024³", True, False),
        ("BM_SgemmOneDNN/256x64x512", "oneDNN f32 256×64×512 (per-expert shape)", True, False),
        ("BM_SgemmOneDNNBf16/256x64x512", "oneDNN bf16 256×64×512", True, False)]
for name, shape in SHAPES:
    title = f"MoA {name} {shape}" if shape else "MoA same, not causal"
    ROWS += [(f"BM_MoA/{name}_forward", f"{title} forward", True, True),
             (f"BM_MoA/{name}_forward_backward", "MoA forward+backward", True, False),
             (f"BM_MHA/{name}_forward", "MHA same shape, k heads, forward", True, True)]
ROWS += [("BM_MoADecode/wide_cache256", "MoA decode step, wide, 8 sequences, 256 cached", True, True),
         ("BM_MHADecode/wide_cache256", "MHA decode step, same", True, True),
         ("BM_TranslateStep_moa", "translate training step, moa:4K8E48D", True, False),
         ("BM_TranslateStep_mha", "translate training step, mha:4H32D", True, False),
         ("BM_AttentionKernel/causal", "attention kernel alone, causal", False, False),
         ("BM_AttentionKernel/noncausal", "attention kernel alone, not causal", False, False)]


def run(moa_bench, flags):
    """One run of the table's benchmarks: name -> (seconds, GFLOP/s, %best, tokens/s)."""
    names = "|".join(name for name, _, _, _ in ROWS)
    command = [moa_bench, *flags, f"--benchmark_filter=^({names})$", "--benchmark_format=json"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = {}
    for entry in json.loads(output)["benchmarks"]:
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[entry["time_unit"]]
        result[entry["run_name"]] = (entry["real_time"] * scale, entry.get("GFLOP/s", 0.0),
                                     entry.get("%best", 0.0), entry.get("tokens/s", 0.0))
    return result


def median_rounds(rounds):
    """Per benchmark, the values of the round with the median time (the lower one of an even count)."""
    result = {}
    for name in rounds[0]:
        measured = sorted((values for values in (one.get(name) for one in rounds) if values), key=lambda v: v[0])
        result[name] = measured[(len(measured) - 1) // 2]
    return result


def duration(seconds):
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moa-bench", default="build/bench/bench/moa_bench", help="path of moa_bench")
    parser.add_argument("--repetitions", type=int, default=3,
                        help="rounds of the three runs; each value shown is the median round's (default 3)")
    arguments = parser.parse_args()
    if arguments.repetitions < 1:
        sys.exit(f"--repetitions must be at least 1, got {arguments.repetitions}")
    if not os.access(arguments.moa_bench, os.X_OK):
        sys.exit(f"no moa_bench at {arguments.moa_bench}: build it with `cmake --workflow --preset bench`, "
                 "or pass --moa-bench")
    configurations = (["--threads=1"], ["--threads=2"], ["--precision=bf16"])
    rounds = [[run(arguments.moa_bench, flags) for flags in configurations] for _ in range(arguments.repetitions)]
    one, two, bf16 = (median_rounds([measured[index] for measured in rounds]) for index in range(3))
    print("| benchmark | 1 thread | GFLOP/s | %best | tokens/s | 2 threads | bf16, 1 thread |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, show_two, show_bf16 in ROWS:
        if name not in one:
            continue
        seconds, gflops, best, tokens = one[name]
        cells = [duration(seconds), f"{gflops:.0f}" if gflops else "", f"{best:.0f}%" if best else "",
                 f"{tokens / 1e3:.0f}k" if tokens else "", "", ""]
        if show_two and name in two:
            cells[4] = f"{duration(two[name][0])} ({seconds / two[name][0]:.2f}x)"
        if show_bf16 and name in bf16:
            cells[5] = f"{duration(bf16[name][0])} ({seconds / bf16[name][0]:.2f}x)"
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
