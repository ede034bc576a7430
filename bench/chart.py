#!/usr/bin/env python3
"""Draws throughput (or p50 latency) against clients, idemd beside the pgbench peer, from
bench/run.sh's CSV.

    python3 bench/chart.py bench/results.csv docs/throughput.svg
    python3 bench/chart.py bench/results.csv docs/latency.svg p50_ms

Plain SVG written by hand: no plotting library needed.
"""
import csv
import sys
from xml.sax.saxutils import escape

METRICS = {
    "ops_per_s": {
        "fresh": "fresh: Acquire+Complete pairs/s",
        "replay": "replay: requests/s (90 % replays)",
    },
    "p50_ms": {
        "fresh": "fresh: p50 ms of a pair (lower is better)",
        "replay": "replay: p50 ms of a request (lower is better)",
    },
}
SERIES = [("idemd", "#1f77b4", "idemd"), ("pgbench", "#d62728", "pgbench peer (same SQL per request)")]
WIDTH, HEIGHT, PANEL_W, TOP, BOTTOM, LEFT = 900, 380, 400, 50, 320, 70


def main(source: str, target: str, metric: str = "ops_per_s") -> None:
    if metric not in METRICS:
        sys.exit(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    panels = list(METRICS[metric].items())
    decimals = 0 if metric == "ops_per_s" else 2
    rows = list(csv.DictReader(open(source, newline="")))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
    ]
    for index, (workload, title) in enumerate(panels):
        x0 = LEFT + index * (PANEL_W + 50)
        points = {
            system: sorted(
                (int(r["clients"]), float(r[metric]))
                for r in rows
                if r["system"] == system and r["workload"] == workload and r[metric]
            )
            for system, _, _ in SERIES
        }
        clients = sorted({c for series in points.values() for c, _ in series}) or [1]
        top = max([v for series in points.values() for _, v in series] or [1]) * 1.15
        x_of = {c: x0 + (i + 0.5) * PANEL_W / len(clients) for i, c in enumerate(clients)}

        def y(value: float) -> float:
            return BOTTOM - (BOTTOM - TOP) * value / top

        out.append(f'<text x="{x0}" y="{TOP - 20}" font-weight="bold">{escape(title)}</text>')
        out.append(f'<line x1="{x0}" y1="{BOTTOM}" x2="{x0 + PANEL_W}" y2="{BOTTOM}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{TOP}" x2="{x0}" y2="{BOTTOM}" stroke="black"/>')
        for step in range(0, 6):
            value = top * step / 5
            out.append(
                f'<text x="{x0 - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:,.{decimals}f}</text>'
            )
            out.append(
                f'<line x1="{x0}" y1="{y(value):.1f}" x2="{x0 + PANEL_W}" y2="{y(value):.1f}" '
                'stroke="#ddd"/>'
            )
        for c, x in x_of.items():
            out.append(f'<text x="{x:.1f}" y="{BOTTOM + 16}" text-anchor="middle">{c}</text>')
        out.append(
            f'<text x="{x0 + PANEL_W / 2}" y="{BOTTOM + 34}" text-anchor="middle">concurrent clients</text>'
        )
        for system, colour, _ in SERIES:
            series = points[system]
            path = " ".join(f"{x_of[c]:.1f},{y(v):.1f}" for c, v in series)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for c, v in series:
                out.append(f'<circle cx="{x_of[c]:.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}"/>')
                out.append(
                    f'<text x="{x_of[c] + 6:.1f}" y="{y(v) - 6:.1f}" fill="{colour}">{v:,.{decimals}f}</text>'
                )
    for index, (_, colour, label) in enumerate(SERIES):
        x = LEFT + index * 300
        out.append(f'<rect x="{x}" y="{HEIGHT - 22}" width="14" height="4" fill="{colour}"/>')
        out.append(f'<text x="{x + 20}" y="{HEIGHT - 16}">{escape(label)}</text>')
    out.append("</svg>")
    with open(target, "w") as handle:
        handle.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
