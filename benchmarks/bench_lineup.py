"""The default line-up (`visionzoo bench` with no arguments) with the roofline, timed end to end.

    python benchmarks/bench_lineup.py [--threads 2] [--batch-size 1 32]

Prints the table, each model's achieved GFLOP/s as a fraction of this machine's matmul peak, and the wall
time of the whole run (the issue asks for under 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import sys

from visionzoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--roofline", *sys.argv[1:]]))
