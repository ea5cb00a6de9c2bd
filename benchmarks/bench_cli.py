"""How long `volttl --help` and `volttl --version` take, against a bare Python start-up
and against `import torch`, in one run (target: --help and --version under 0.5 s).

    python benchmarks/bench_cli.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time


def timed(args: list[str], repeats: int) -> float:
    """Median wall time of a fresh process running ``args``, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    bare = timed(["-c", "pass"], repeats)
    torch = timed(["-c", "import torch"], repeats)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"median of {repeats}")
    print(f"{'bare python':<18} {bare:6.2f} s")
    print(f"{'import torch':<18} {torch:6.2f} s")
    for name, args in (("volttl --help", ["-m", "volttl", "--help"]),
                       ("volttl --version", ["-m", "volttl", "--version"])):
        t = timed(args, repeats)
        print(f"{name:<18} {t:6.2f} s  ({t / torch:.2f}x import torch; target < 0.5 s: "
              f"{'met' if t < 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
