"""The live advisor against the offline tools on the same engine: the batch-size knee and the
energy per output token.

Runs `vllm-exporter tune batch-size` (the real command, --json) against a running daemon while
sampling the daemon's /metrics here every --interval seconds (and, where pynvml is installed,
the GPUs' energy counters directly from NVML). Then it prints, side by side:

- the sweep's client-side output throughput and inter-token latency per concurrency, with the
  knee the advisor's own criterion finds in those points (the first point after which
  throughput grows by less than knee_gain per step while it grew before, and inter-token
  latency still grows);
- the advisor's batch groups (engine-side decode tokens/s per running batch, from the samples
  taken here over the sweep) and the batch_size_knee advice the rule gives for that window;
- energy per output token over the sampled span: the family's computation
  (vllm_gpu_energy_joules_total increase on the engine's GPUs / vllm_generation_tokens_total
  increase) against NVML's total energy read here / the same tokens; and the daemon's own
  live gauge and window from /advice.

GPU machine (docs/tuning.md has the run):
    python3 -m bench.bench_live_advice --daemon-api http://127.0.0.1:8000 \\
        --daemon-metrics http://127.0.0.1:9410 --concurrency 4,8,16,32,64,128,256 \\
        --rounds 6 --prompt-len fixed:200 --output-len fixed:128 --json live.json \\
        --plot live-advice.png
This CPU machine (a running daemon, e.g. `vllm-exporter serve`):
    .venv/bin/python -m bench.bench_live_advice --concurrency 1,2,4,8,16 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time

from exporter.advice.cli import from_daemon, scrape_reading
from exporter.advice.config import AdviceConfig
from exporter.advice.forecast import energy_per_output_token
from exporter.advice.readings import Reading, windows
from exporter.advice.rules import batch_knee


class Sampler(threading.Thread):
    """The daemon's /metrics (as the advisor reads it) and NVML's energy, every `interval` s."""

    def __init__(self, metrics_url: str, interval: float):
        super().__init__(name="sampler", daemon=True)
        self.metrics_url, self.interval = metrics_url, interval
        self.readings: list[Reading] = []
        self.nvml: list[tuple[float, float]] = []  # (time, joules summed over every GPU)
        self.errors = 0
        self._halt = threading.Event()
        self._handles = nvml_handles()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                reading = scrape_reading(self.metrics_url)
                if self._handles:
                    self.nvml.append((reading.t, nvml_joules(self._handles)))
                self.readings.append(reading)
            except Exception as exc:  # a missed sample widens one interval; counted, shown
                self.errors += 1
                print(f"sample failed: {exc}", file=sys.stderr)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def nvml_handles() -> list:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i)
                for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVML here (the CPU machine): energy is not compared
        return []


def nvml_joules(handles: list) -> float:
    import pynvml

    return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles) / 1e3


def sweep_knee(points: list[dict], gain: float) -> int | None:
    """The advisor's knee criterion applied to the sweep's client-side points."""
    j = batch_knee.find_knee([p["client"]["output_tokens_per_second"] for p in points],
                             [p["client"]["itl_seconds"]["p50"] or math.nan for p in points],
                             gain)
    return None if j is None else points[j]["concurrency"]


def plot(figures: dict, path: str) -> None:
    """The sweep's client-side points and the advisor's engine-side batch groups on one
    batch axis, with the KV-cache limit the daemon's own advice gave (if any)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    points, groups = figures["sweep"], figures.get("groups") or []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    x = [p["concurrency"] for p in points]
    top.plot(x, [p["client"]["output_tokens_per_second"] for p in points], "o-",
             label="tune batch-size: output tokens/s by client concurrency")
    bottom.plot(x, [(p["client"]["itl_seconds"]["p50"] or math.nan) * 1e3 for p in points],
                "o-", label="tune batch-size: ITL p50 (client)")
    if groups:
        gx = [g[0] for g in groups]
        top.plot(gx, [g[1] for g in groups], "s--",
                 label="advisor: engine decode tokens/s by running batch (group upper bound)")
        bottom.plot(gx, [g[2] * 1e3 for g in groups], "s--",
                    label="advisor: mean ITL by running batch")
    limits = [a["suggested"] for m in (figures.get("live") or {}).get("models", [])
              for a in m["advice"] if a["rule"] == "kv_cache_pressure"]
    for axis in (top, bottom):
        for limit in limits:
            axis.axvline(limit, color="tab:red", linestyle=":",
                         label=f"KV cache holds {limit:g} sequences (kv_cache_pressure)"
                         if axis is top else None)
        axis.set_xscale("log", base=2)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small", loc="upper left")
    top.set_ylabel("tokens/s")
    top.set_title("batch-size knee: the live advisor against tune batch-size, same engine")
    bottom.set_ylabel("inter-token latency (ms)")
    bottom.set_xlabel("client concurrency / engine running batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daemon-api", default="http://127.0.0.1:8000")
    parser.add_argument("--daemon-metrics", default="http://127.0.0.1:9410")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompt-len", default="fixed:64")
    parser.add_argument("--output-len", default="fixed:64")
    parser.add_argument("--objective", default="itl_p95=10",
                        help="passed to tune batch-size (a loose bound: the knee is compared, "
                             "not the choice)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--knee-min-samples", type=int, default=AdviceConfig.knee_min_samples)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--plot", help="also draw the two views to this PNG (needs matplotlib)")
    parser.add_argument("--plot-from", metavar="JSON",
                        help="only draw --plot from the figures a run wrote with --json")
    args = parser.parse_args()
    if args.plot_from:
        with open(args.plot_from) as saved:
            plot(json.load(saved), args.plot or "live-advice.png")
        return 0

    metrics_url = args.daemon_metrics.rstrip("/") + "/metrics"
    sampler = Sampler(metrics_url, args.interval)
    sampler.start()
    started = time.time()
    tune = subprocess.run(
        [sys.executable, "-m", "exporter", "tune", "batch-size", "--daemon-api", args.daemon_api,
         "--daemon-metrics", args.daemon_metrics, "--concurrency", args.concurrency,
         "--rounds", str(args.rounds), "--prompt-len", args.prompt_len,
         "--output-len", args.output_len, "--objective", args.objective, "--plot", "",
         "--json"], capture_output=True, text=True)
    time.sleep(2 * args.interval)  # the last point's tail in the samples
    sampler.stop()
    if tune.returncode not in (0, 1):  # 1: no point met the objective, still a sweep
        print(tune.stdout[-2000:], tune.stderr[-4000:], file=sys.stderr)
        return 2
    sweep = json.loads(tune.stdout)
    points = sweep["points"]
    settings = AdviceConfig(interval_seconds=args.interval,
                            window_seconds=time.time() - started + args.interval,
                            knee_min_samples=args.knee_min_samples, min_requests=1)

    workload = sweep["workload"]
    print(f"sweep by `vllm-exporter tune batch-size` (prompts {workload['prompt_len']}, "
          f"output {workload['output_len']} tokens), client side")
    print(f"{'concurrency':>11}{'out tok/s':>11}{'gain':>8}{'ITL p50 ms':>12}{'ITL p95 ms':>12}")
    previous = None
    for p in points:
        c = p["client"]
        tps = c["output_tokens_per_second"]
        gain = f"{tps / previous - 1:+.0%}" if previous else ""
        print(f"{p['concurrency']:>11}{tps:>11.1f}{gain:>8}"
              f"{(c['itl_seconds']['p50'] or math.nan) * 1e3:>12.2f}"
              f"{(c['itl_seconds']['p95'] or math.nan) * 1e3:>12.2f}")
        previous = tps
    knee_sweep = sweep_knee(points, settings.knee_gain)
    print(f"knee of the sweep (the advisor's criterion, gain < {settings.knee_gain:.0%} per "
          f"step after it): {knee_sweep if knee_sweep is not None else 'none'}")

    figures: dict = {"sweep": points, "knee_sweep": knee_sweep,
                     "samples": len(sampler.readings), "sample_errors": sampler.errors}
    for w in windows(sampler.readings):
        print(f"\nthe advisor over the same {w.seconds:.0f} s ({len(sampler.readings)} samples "
              f"every {args.interval:g} s, {sampler.errors} failed), model {w.model}, "
              f"max_num_seqs {w.setting('max_num_seqs')}")
        found = batch_knee.groups(w, settings.knee_min_samples)
        print(f"{'batch <=':>9}{'decode tok/s':>14}{'gain':>8}{'ITL ms':>9}{'intervals':>11}")
        previous = None
        for bound, tps, itl, n in found:
            gain = f"{tps / previous - 1:+.0%}" if previous else ""
            print(f"{bound:>9}{tps:>14.1f}{gain:>8}{itl * 1e3:>9.2f}{n:>11}")
            previous = tps
        advice = batch_knee.evaluate(w, settings)
        for a in advice:
            print(f"advice: {a.parameter} {a.current:g} -> {a.suggested:g} ({a.confidence}): "
                  f"{a.summary}")
        if not advice:
            print("advice: none (batch_size_knee silent)")
        figures["groups"] = found
        figures["knee_advisor"] = advice[0].suggested if advice else None

        ours = energy_per_output_token(w)
        if ours is not None and sampler.nvml:
            tokens = w.delta("vllm_generation_tokens_total")
            first, last = w.readings[0].t, w.latest.t
            nvml = {t: j for t, j in sampler.nvml}
            direct = (nvml[last] - nvml[first]) / tokens
            print(f"\nenergy per output token over {last - first:.0f} s, {tokens:,.0f} tokens: "
                  f"vllm_gpu_energy_joules_total increase / tokens {ours:.4f} J; NVML total "
                  f"energy read here / tokens {direct:.4f} J; ratio {ours / direct:.4f}")
            figures["energy"] = {"ours": ours, "nvml": direct, "tokens": tokens}
        elif ours is None:
            print("\nenergy per output token: absent (no NVML energy in the daemon's metrics)")
    try:
        live = from_daemon(args.daemon_metrics)
        for model in live["models"]:
            knee = [a for a in model["advice"] if a["rule"] == "batch_size_knee"]
            print(f"\nthe daemon's own /advice (window {model['window_seconds']} s): "
                  f"batch_size_knee {knee[0]['suggested'] if knee else 'silent'}; energy per "
                  f"output token {model['energy_per_output_token_joules']}")
        figures["live"] = live
    except Exception as exc:
        print(f"\nthe daemon's /advice: {exc}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1, default=str)
    if args.plot:
        plot(figures, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
