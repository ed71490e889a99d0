"""Render the generated dashboards to PNG from a real Prometheus, without a Grafana server
(the drawing is testsupport/dashboard_png.py). From the repository root:

    python -m bench.render_dashboards --prometheus http://127.0.0.1:9090 --out docs/img \
        --minutes 15 --var model=my-model

tests/test_dashboards.py draws the same pictures from the live test Prometheus when
DASHBOARD_PNG_DIR is set (DASHBOARD_PNG_DIR=docs/img refreshes the images in docs/).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from testsupport.dashboard_png import render_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL of a Prometheus")
    parser.add_argument("--out", default="docs/img", help="folder for dashboard-*.png")
    parser.add_argument("--minutes", type=float, default=15, help="time range to draw")
    parser.add_argument("--rate-interval", default="1m", help="value of $__rate_interval")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="a template variable's value (regex); default .* for job, "
                             "instance, model, gpu")
    args = parser.parse_args()
    end = time.time()
    start = end - args.minutes * 60
    variables = {"job": ".*", "instance": ".*", "model": ".*", "gpu": ".*",
                 "slo_target": "0.99", "error_target": "0.999",
                 "__rate_interval": args.rate_interval, "__range": f"{int(args.minutes)}m"}
    for item in args.var:
        name, _, value = item.partition("=")
        variables[name] = value
    for path in render_all(args.prometheus, Path(args.out), variables, start, end,
                           step=max(args.minutes * 60 / 300, 1)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
