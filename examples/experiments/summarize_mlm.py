#!/usr/bin/env python3
"""Summary of the masked-LM scaling runs (mlm_scaling.sh): a markdown table (mean ± standard
deviation over seeds) and OUTPUT/scaling.svg, test perplexity and tokens/s against the number of
experts, MHA as a dashed line. Usage: summarize_mlm.py OUTPUT runs/.../results.json ..."""
import json
import math
import re
import statistics
import sys


def mean_sd(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def experts_of(attention):
    """E for MoA, the routed heads for MoH, None for MHA."""
    match = re.match(r"moa(?:-ec)?:\d+K(\d+)E", attention) or re.match(r"moh:\d+S\d+K(\d+)H", attention)
    return int(match.group(1)) if match else None


def main(output, paths):
    groups = {}
    for path in paths:
        with open(path) as file:
            for run in json.load(file)["runs"]:
                groups.setdefault(run["attention"], []).append(run)
    rows = []
    for attention, runs in groups.items():
        experts = experts_of(attention)
        rows.append((experts if experts else math.inf, attention, runs))
    rows.sort()
    print(f"| attention | experts | parameters | seeds | test perplexity | valid perplexity | test accuracy | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    points = []
    for experts, attention, runs in rows:
        test = mean_sd([math.exp(r["test_loss"]) for r in runs])
        valid = mean_sd([math.exp(r["valid_loss"]) for r in runs])
        accuracy = mean_sd([100 * r["test_accuracy"] for r in runs])
        speed = mean_sd([r["tokens_per_second"] for r in runs])
        shown = "-" if experts == math.inf else str(experts)
        print(f"| {attention} | {shown} | {runs[0]['parameters']:,} | {len(runs)} | {test[0]:.2f} ± {test[1]:.2f} "
              f"| {valid[0]:.2f} ± {valid[1]:.2f} | {accuracy[0]:.1f}% ± {accuracy[1]:.1f} | {speed[0]:,.0f} ± {speed[1]:,.0f} |")
        # The chart is token choice's scaling, MHA the line; expert choice and MoH are table rows.
        if attention.startswith(("moa:", "mha:")):
            points.append((experts, attention, test, speed))
    if points:
        write_chart(f"{output}/scaling.svg", points)
        print(f"\nchart: {output}/scaling.svg")


def write_chart(path, points):
    """Two panels side by side: test perplexity and tokens/s against log2(E), error bars one SD."""
    moa = [p for p in points if p[0] != math.inf]
    mha = [p for p in points if p[0] == math.inf]
    width, height, margin = 360, 260, 55
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{2 * width}' height='{height}' font-family='sans-serif' font-size='11'>",
             "<rect width='100%' height='100%' fill='white'/>"]
    for panel, (title, index) in enumerate([("test perplexity (lower is better)", 2), ("training tokens/s", 3)]):
        left = panel * width + margin
        values = [p[index][0] + s * p[index][1] for p in points for s in (-1, 1)]
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or 1.0
        low, high = low - pad, high + pad
        xs = [math.log2(p[0]) for p in moa] or [0.0]
        x_low, x_high = min(xs) - 0.5, max(xs) + 0.5
        plot_width, plot_height = width - margin - 15, height - 2 * margin

        def x_of(value):
            return left + (value - x_low) / (x_high - x_low) * plot_width

        def y_of(value):
            return margin + (high - value) / (high - low) * plot_height

        parts.append(f"<text x='{left}' y='{margin - 15}' font-size='13'>{title}</text>")
        parts.append(f"<rect x='{left}' y='{margin}' width='{plot_width}' height='{plot_height}' fill='none' stroke='#888'/>")
        for tick in range(5):
            value = low + (high - low) * tick / 4
            parts.append(f"<text x='{left - 5}' y='{y_of(value) + 4:.1f}' text-anchor='end'>{value:,.1f}</text>")
        for experts, _, *_ in moa:
            parts.append(f"<text x='{x_of(math.log2(experts)):.1f}' y='{margin + plot_height + 15}' text-anchor='middle'>E={experts}</text>")
        line = " ".join(f"{x_of(math.log2(p[0])):.1f},{y_of(p[index][0]):.1f}" for p in moa)
        parts.append(f"<polyline points='{line}' fill='none' stroke='#1f77b4' stroke-width='2'/>")
        for p in moa:
            x = x_of(math.log2(p[0]))
            mean, sd = p[index]
            parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{y_of(mean - sd):.1f}' y2='{y_of(mean + sd):.1f}' stroke='#1f77b4'/>")
            parts.append(f"<circle cx='{x:.1f}' cy='{y_of(mean):.1f}' r='3' fill='#1f77b4'/>")
        for p in mha:
            mean = p[index][0]
            parts.append(f"<line x1='{left}' x2='{left + plot_width}' y1='{y_of(mean):.1f}' y2='{y_of(mean):.1f}' "
                         f"stroke='#d62728' stroke-dasharray='5,4'/>")
            parts.append(f"<text x='{left + plot_width - 4}' y='{y_of(mean) - 4:.1f}' text-anchor='end' fill='#d62728'>{p[1]}</text>")
        parts.append(f"<text x='{left + plot_width / 2}' y='{height - 12}' text-anchor='middle'>MoA experts (top-4, head width 48)</text>")
    parts.append("</svg>")
    with open(path, "w") as file:
        file.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
