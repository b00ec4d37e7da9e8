"""Run the benchmarks: `python -m bench` (or `nox -s bench`).

Prints a table per scenario (p50, p99 and the ratio to the baseline run
beside it), and writes results.json and one PNG plot per scenario to the
output directory (docs/performance by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from . import connections, scenarios
from .scenarios import Result

SCENARIOS: dict[str, Callable[[argparse.Namespace], Awaitable[Result]]] = {
    "latency": lambda a: scenarios.start_to_exit_latency(a.runs),
    "throughput": lambda a: scenarios.throughput(tuple(a.levels), a.per_level),
    "memory-latency": lambda a: scenarios.latency_under_memory(max(50, a.runs // 5)),
    "excursion": lambda a: scenarios.excursion_latency(max(50, a.runs // 5)),
    "pid-file": lambda a: scenarios.pid_file_detection(max(100, a.runs // 2)),
    "memory": lambda a: scenarios.memory(a.live),
    "services": lambda a: scenarios.many_services(a.services),
    "cpu": lambda a: scenarios.cpu_per_start(a.runs),
    "first": lambda a: scenarios.first_container(max(10, a.runs // 20)),
    "connection-latency": lambda a: connections.connection_latency(max(100, a.runs // 2)),
    "connections": lambda a: connections.connections_per_second(500, 8),
}


def _scale(result: Result) -> float:
    return 1000.0 if result.unit == "ms" else 1.0


def print_table(result: Result) -> None:
    """Print one scenario's table."""
    scale = _scale(result)
    print(f"\n## {result.scenario} ({result.unit})")
    width = max(len(s.name) for s in result.series)
    for series in result.series:
        baseline = _baseline_of(result, series.name)
        base = next((s for s in result.series if s.name == baseline), result.series[0])
        p50 = series.quantile(0.5)
        base_p50 = base.quantile(0.5)
        ratio = p50 / base_p50 if base_p50 else math.nan
        line = f"  {series.name.ljust(width)}  p50 {p50 * scale:10.3f}"
        if len(series.values) > 1:
            line += f"  p99 {series.quantile(0.99) * scale:10.3f}  n={len(series.values)}"
        line += f"  ratio to {baseline}: {ratio:6.2f}x"
        print(line)
    for note in result.notes:
        print(f"  note: {note}")


def _baseline_of(result: Result, name: str) -> str:
    """Return the baseline series a series compares with."""
    if result.per_level and " x" in name:
        return f"{result.baseline} x{name.rsplit(' x', 1)[1]}"
    return result.baseline


def plot(result: Result, path: str) -> None:
    """Write a PNG of the scenario: a box per variant, or bars for single values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = _scale(result)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    names = [s.name for s in result.series]
    if all(len(s.values) > 1 for s in result.series):
        axes.boxplot(
            [[v * scale for v in s.values] for s in result.series],
            orientation="horizontal",
            showfliers=False,
        )
        axes.set_yticks(range(1, len(names) + 1), names)
    else:
        axes.barh(names, [s.quantile(0.5) * scale for s in result.series])
    if result.log_axis:
        axes.set_xscale("log")
    axes.set_xlabel(result.unit)
    axes.set_title(result.scenario)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _record(result: Result) -> dict[str, Any]:
    scale = _scale(result)
    return {
        "scenario": result.scenario,
        "unit": result.unit,
        "baseline": result.baseline,
        "notes": result.notes,
        "series": {
            s.name: {
                "n": len(s.values),
                "p50": s.quantile(0.5) * scale,
                "p99": s.quantile(0.99) * scale,
            }
            for s in result.series
        },
    }


async def run(arguments: argparse.Namespace) -> list[Result]:
    """Run the chosen scenarios in order."""
    results = []
    for name in arguments.scenario or list(SCENARIOS):
        result = await SCENARIOS[name](arguments)
        print_table(result)
        results.append(result)
    return results


def main() -> int:
    """Parse the arguments, run, print, and write the results and plots."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="*", choices=[[], *SCENARIOS], metavar="SCENARIO")
    parser.add_argument("--runs", type=int, default=500, help="runs of the latency scenario")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 10, 50, 200])
    parser.add_argument("--per-level", type=int, default=200)
    parser.add_argument("--live", type=int, default=100, help="live containers for memory")
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="trio")
    parser.add_argument("--output", default=os.path.join("docs", "performance"))
    arguments = parser.parse_args()
    for package, tool in (("bubblewrap", "bwrap"), ("socat", "socat")):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing: apt-get install {package}", file=sys.stderr)
            return 2
    print(f"# machine: {scenarios.machine()}; backend {arguments.backend}")
    results = anyio.run(run, arguments, backend=arguments.backend)
    os.makedirs(arguments.output, exist_ok=True)
    with open(os.path.join(arguments.output, "results.json"), "w") as file:
        json.dump(
            {
                "machine": scenarios.machine(),
                "backend": arguments.backend,
                "results": [_record(r) for r in results],
            },
            file,
            indent=2,
        )
    for name, result in zip(arguments.scenario or list(SCENARIOS), results, strict=True):
        plot(result, os.path.join(arguments.output, f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
