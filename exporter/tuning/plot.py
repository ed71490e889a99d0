"""The sweep's PNG: output throughput, and p95 TTFT / inter-token latency, against concurrency."""

from __future__ import annotations


def plot_sweep(sweep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    points = sweep["points"]
    x = [p["concurrency"] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 6.5), sharex=True)
    top.plot(x, [p["client"]["output_tokens_per_second"] for p in points], "o-",
             color="tab:blue", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    top.set_title(f"tune batch-size: {sweep['model']}")
    top.grid(True, alpha=0.3)

    series = (("ttft", "ttft_seconds", "tab:orange"), ("itl", "itl_seconds", "tab:green"))
    for name, key, color in series:
        bottom.plot(x, [_ms(p["client"][key]["p95"]) for p in points], "o-", color=color,
                    label=f"{name.upper()} p95 (client)")
        bottom.plot(x, [_ms(p["daemon"][key]["p95"]) for p in points], "s--", color=color,
                    alpha=0.6, label=f"{name.upper()} p95 (daemon histogram)")
        bound = sweep["objective"].get(f"{name}_p95")
        if bound:
            bottom.axhline(bound * 1000, color=color, linestyle=":",
                           label=f"{name.upper()} p95 objective")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("client concurrency")
    bottom.grid(True, which="both", alpha=0.3)
    bottom.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    chosen = sweep["chosen_concurrency"]
    if chosen is not None:
        point = next(p for p in points if p["concurrency"] == chosen)
        top.plot([chosen], [point["client"]["output_tokens_per_second"]], "*", markersize=16,
                 color="tab:red", label=f"chosen: {chosen}")
    top.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(x)
    bottom.set_xticklabels([str(v) for v in x])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(seconds):
    return float("nan") if seconds is None else seconds * 1000
