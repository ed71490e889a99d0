"""Speculative decoding and sleep mode on a real engine: our families against vLLM's own.

Starts the daemon (`python -m exporter serve`) with a `speculative_config` and
`enable_sleep_mode`, with VLLM_SERVER_DEV_MODE=1 so that vLLM's server answers `/sleep`,
`/wake_up` and `/is_sleeping`, then

1. sends completions (half greedy, half sampled at temperature 1, so that some drafts are
   rejected even with dummy weights) and prints, side by side, our `vllm_spec_decode_*`
   counters and vLLM's own `vllm:spec_decode_*` (drafts, draft tokens, accepted tokens,
   accepted per draft position), read when both have counted every request, with an
   exact-equality flag per figure;
2. puts the engine to sleep (level 1, then level 2) and wakes it, reading after each call
   vLLM's `/is_sleeping`, which of our `vllm_engine_sleep_state` series is 1 and vLLM's own
   `vllm:engine_sleep_state`; then a completion after each wake-up (after level 2 the weights
   are not reloaded: with dummy weights the engine computes on whatever the memory holds).

Every check prints PASS or FAIL; the exit code is 1 if any failed (2 if the daemon did not start).

Speculation methods: `draft_model` (the default: a separate small model that shares the target's
tokenizer; vLLM loads it with the target's load config, so `load_format=dummy` applies to it
too) and `ngram` (no model; runs on the CPU build). The draft model folder is written by this
script from the target's config and tokenizer files (`--draft-dir`; built when it has no
config.json, or always with `--build-draft`): a 2-layer Llama, hidden 256, 4 heads, with the
target's vocabulary size, bos/eos and dtype, and no weights.

On the GPU machine (CUDA vLLM under /tmp/site, the project at /tmp/snap, the Llama-2-7B-shaped
folder of the GPU recipe at /tmp/llama2-7b-shape):
    cd /tmp/snap && PYTHONPATH=/tmp/site:/tmp/snap python3 -m bench.verify_engine_features \\
        --target /tmp/llama2-7b-shape --draft-dir /tmp/llama2-draft --gpu-memory-utilization 0.5 \\
        --timeout 420
On this machine (the CPU build runs n-gram and draft-model speculation; it refuses
enable_sleep_mode, and its worker's sleep is a no-op, so `--without-sleep-mode` checks only the
path from vLLM's /sleep and /wake_up to the gauges):
    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.verify_engine_features --method ngram \\
        --without-sleep-mode
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from testsupport.exposition import Samples
from testsupport.net import free_port
from testsupport.processes import log_tail, start_group, stop_group, wait_url
from testsupport.waiting import wait_for

SERVED = "verify"
OURS = {"model": SERVED, "engine": "0"}
VLLMS = {"model_name": SERVED, "engine": "0"}
# (what, our counter, vLLM's counter)
SPEC_COUNTERS = (
    ("drafts", "vllm_spec_decode_drafts_total", "vllm:spec_decode_num_drafts_total"),
    ("draft tokens", "vllm_spec_decode_draft_tokens_total",
     "vllm:spec_decode_num_draft_tokens_total"),
    ("accepted tokens", "vllm_spec_decode_accepted_tokens_total",
     "vllm:spec_decode_num_accepted_tokens_total"),
)
OUR_PER_POSITION = "vllm_spec_decode_accepted_tokens_per_position_total"
VLLM_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
OUR_SLEEP = "vllm_engine_sleep_state"
VLLM_SLEEP = "vllm:engine_sleep_state"
# The state each sleep level puts the engine in: our label value (vLLM uses the same names).
LEVEL_STATE = {1: "weights_offloaded", 2: "discard_all"}
# Files that make up a Hugging Face tokenizer (whichever of them the target has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
# Config keys the draft takes over from the target as they are.
SHARED_CONFIG_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id",
                      "max_position_embeddings", "rms_norm_eps", "rope_theta",
                      "rope_parameters", "rope_scaling", "torch_dtype", "dtype")
ERROR_LINE = re.compile(r"(Error|Exception|error:|Traceback|rejected|not supported)",
                        re.IGNORECASE)


class Checks:
    """Named checks with their outcome, printed together at the end."""

    def __init__(self):
        self.results: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok), detail))
        return bool(ok)

    def report(self) -> bool:
        print("\nchecks")
        for name, ok, detail in self.results:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
        failed = sum(not ok for _, ok, _ in self.results)
        print(f"{'FAIL' if failed else 'PASS'}: {len(self.results) - failed} of "
              f"{len(self.results)} checks passed")
        return not failed


# --- the draft model --------------------------------------------------------------------------

def build_draft(target: Path, out: Path) -> dict:
    """A weightless 2-layer Llama in `out` that shares `target`'s tokenizer and vocabulary."""
    target_config = json.loads((target / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copyfile(target / name, out / name)
            copied.append(name)
    if not copied:
        raise SystemExit(f"{target} has none of the tokenizer files {TOKENIZER_FILES}")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
              "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
    config.update({key: target_config[key] for key in SHARED_CONFIG_KEYS
                   if key in target_config})
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "README").write_text(f"Draft model for {target} (vllm-exporter "
                                "bench.verify_engine_features): no weights, load_format=dummy.\n")
    print(f"draft model: {out} (tokenizer files {', '.join(copied)}; vocab_size "
          f"{config.get('vocab_size')}, bos {config.get('bos_token_id')}, eos "
          f"{config.get('eos_token_id')})")
    return config


def speculative_config(args) -> dict:
    if args.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": args.num_spec_tokens,
                "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    return {"method": "draft_model", "model": str(args.draft_dir),
            "num_speculative_tokens": args.num_spec_tokens}


# --- the daemon -------------------------------------------------------------------------------

def daemon_command(args, spec: dict) -> list[str]:
    command = [sys.executable, "-m", "exporter", "serve", "--model", str(args.target),
               "--served-model-name", SERVED, "--max-model-len", str(args.max_model_len),
               "--host", "127.0.0.1", "--port", str(args.port),
               "--metrics-port", str(args.metrics_port),
               "--engine-arg", "load_format=dummy",
               "--engine-arg", "speculative_config=" + json.dumps(spec)]
    if not args.no_sleep and not args.without_sleep_mode:
        command += ["--engine-arg", "enable_sleep_mode=true"]
    if args.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return command


def error_lines(log: Path, limit: int = 12) -> str:
    """The log's last lines that look like errors (the reason a start failed)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    hits = [line for line in lines if ERROR_LINE.search(line)
            and not re.search(r" (DEBUG|INFO|WARNING) ", line)]
    return "\n".join(hits[-limit:]) or "<no error line>"


# --- HTTP -------------------------------------------------------------------------------------

class Server:
    def __init__(self, api: str, metrics: str):
        self.api, self.metrics = api, metrics
        self.http = httpx.Client(timeout=120)

    def ours(self) -> Samples:
        response = self.http.get(self.metrics + "/metrics")
        response.raise_for_status()
        return Samples(response.text)

    def vllms(self) -> Samples:
        response = self.http.get(self.api + "/metrics")
        response.raise_for_status()
        return Samples(response.text)

    def complete(self, prompt: str, max_tokens: int,
                 temperature: float = 0.0) -> tuple[int, int]:
        """(HTTP status, completion tokens) of one completion."""
        response = self.http.post(self.api + "/v1/completions", json={
            "model": SERVED, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature, "ignore_eos": True})
        if response.status_code != 200:
            return response.status_code, 0
        return 200, response.json()["usage"]["completion_tokens"]

    def is_sleeping(self) -> str:
        try:
            response = self.http.get(self.api + "/is_sleeping")
        except httpx.HTTPError as exc:
            return f"error {exc!r}"
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        return str(response.json().get("is_sleeping")).lower()

    def post(self, path: str) -> tuple[int, str]:
        response = self.http.post(self.api + path, timeout=600)
        return response.status_code, response.text[:300]

    def probe(self, path: str) -> int:
        try:
            return self.http.get(self.metrics + path, timeout=5).status_code
        except httpx.HTTPError:
            return -1


def prompt(index: int) -> str:
    """Repetitive text (n-gram drafts find matches in it); words the 7B-shaped folder's
    WordLevel vocabulary and the default model's byte-level BPE both know."""
    return f"request {index} " + "the of and to a in is it you that " * 8


def run_load(server: Server, requests: int, concurrency: int, max_tokens: int) -> list:
    """Half greedy, half sampled at temperature 1: with dummy weights a greedy target repeats
    one token (every draft accepted), a sampled one rejects most drafts; together the
    per-position counts differ."""
    def one(index: int) -> tuple[int, int]:
        return server.complete(prompt(index), max_tokens, temperature=float(index % 2))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(requests)))


# --- speculative decoding ---------------------------------------------------------------------

def finished(ours: Samples, vllms: Samples) -> tuple[float, float]:
    return (ours.get("vllm_requests_finished_total", **OURS),
            vllms.get("vllm:request_success_total", **VLLMS))


def positions(samples: Samples, name: str, labels: dict) -> dict[str, float]:
    return {l["position"]: v for l, v in samples.series(name)
            if all(l.get(k) == x for k, x in labels.items())}


def spec_figures(ours: Samples, vllms: Samples) -> list[tuple[str, float, float]]:
    rows = [(what, ours.get(our, **OURS), vllms.get(their, **VLLMS))
            for what, our, their in SPEC_COUNTERS]
    our_pos = positions(ours, OUR_PER_POSITION, OURS)
    their_pos = positions(vllms, VLLM_PER_POSITION, VLLMS)
    for position in sorted(set(our_pos) | set(their_pos), key=lambda p: (len(p), p)):
        rows.append((f"accepted at position {position}", our_pos.get(position, float("nan")),
                     their_pos.get(position, float("nan"))))
    return rows


def verify_spec_decode(server: Server, args, checks: Checks) -> None:
    began = time.monotonic()
    results = run_load(server, args.requests, args.concurrency, args.max_tokens)
    seconds = time.monotonic() - began
    ok = [r for r in results if r[0] == 200]
    tokens = sum(t for _, t in ok)
    print(f"\nload: {len(ok)}/{len(results)} completions answered 200, {tokens} tokens out "
          f"in {seconds:.1f} s")
    checks.add("every completion of the load answered 200 with max_tokens tokens",
               len(ok) == len(results) and all(t == args.max_tokens for _, t in ok),
               f"{len(ok)}/{len(results)}, statuses {sorted({s for s, _ in results})}")

    def counted():
        ours, vllms = server.ours(), server.vllms()
        both = finished(ours, vllms)
        return (ours, vllms) if both[0] >= len(results) and both[1] >= len(results) else None

    try:
        ours, vllms = wait_for(counted, 30, 0.2, "both endpoints to count every request")
    except AssertionError as exc:
        print(exc)
        ours, vllms = server.ours(), server.vllms()
    # Counted everything both saw at quiescence; a late shard write would show as a difference
    # that a second read a moment later no longer has, so read until equal (up to 10 s).
    deadline = time.monotonic() + 10
    rows = spec_figures(ours, vllms)
    while any(a != b for _, a, b in rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        ours, vllms = server.ours(), server.vllms()
        rows = spec_figures(ours, vllms)

    our_done, their_done = finished(ours, vllms)
    print(f"\n{'speculative decoding (' + args.method + ')':<34}{'ours':>12}{'vLLM':>12}  equal")
    for what, a, b in [("requests finished", our_done, their_done)] + rows:
        print(f"{what:<34}{a:>12g}{b:>12g}  {'yes' if a == b else 'NO'}")
    drafts, drafted, accepted = rows[0][1], rows[1][1], rows[2][1]
    if drafted:
        print(f"acceptance rate {accepted / drafted:.4f}, mean accepted length per draft "
              f"{1 + accepted / drafts:.3f} (ours)")

    checks.add("requests finished: ours == vLLM's == sent",
               our_done == their_done == len(results), f"{our_done:g} / {their_done:g} / "
               f"{len(results)}")
    checks.add("speculation ran (vLLM counted drafts)", rows[0][2] > 0, f"{rows[0][2]:g} drafts")
    for what, a, b in rows:
        checks.add(f"spec decode {what}: ours == vLLM's", a == b, f"{a:g} vs {b:g}")
    expected = {str(p) for p in range(args.num_spec_tokens)}
    our_pos = positions(ours, OUR_PER_POSITION, OURS)
    checks.add("per-position series: one per speculative token, ours and vLLM's",
               set(our_pos) == expected == set(positions(vllms, VLLM_PER_POSITION, VLLMS)),
               f"ours {sorted(our_pos)}")
    checks.add("accepted <= draft tokens <= num_spec_tokens x drafts, positions add up",
               accepted <= drafted <= args.num_spec_tokens * drafts
               and sum(our_pos.values()) == accepted)
    info = next(iter(ours.series("vllm_engine_config_info")), ({}, 0))[0]
    checks.add("vllm_engine_config_info names the method and token count vLLM ran with",
               (info.get("speculative_method"), info.get("num_speculative_tokens"))
               == (args.method, str(args.num_spec_tokens)),
               f"{info.get('speculative_method')}, {info.get('num_speculative_tokens')}")


# --- sleep mode -------------------------------------------------------------------------------

def states_at_one(samples: Samples, name: str, labels: dict) -> list[str]:
    return sorted(samples.label_values_at(name, "sleep_state", 1, **labels))


def sleep_row(server: Server, step: str) -> dict:
    ours, vllms = server.ours(), server.vllms()
    row = {"step": step, "is_sleeping": server.is_sleeping(),
           "ours": states_at_one(ours, OUR_SLEEP, OURS),
           "vllm": states_at_one(vllms, VLLM_SLEEP, VLLMS),
           "vllm_has_gauge": bool(vllms.series(VLLM_SLEEP)),
           "ready": server.probe("/-/ready"), "healthy": server.probe("/-/healthy")}
    print(f"{step:<24}{row['is_sleeping']:>12}  {','.join(row['ours']) or '-':<20}"
          f"{','.join(row['vllm']) if row['vllm_has_gauge'] else 'no gauge':<20}"
          f"{row['ready']:>6}{row['healthy']:>8}", flush=True)
    return row


def settled_row(server: Server, step: str, expect_sleeping: str, expect_state: str) -> dict:
    """The row once /is_sleeping and our gauge show what is expected (up to 10 s), or the last
    read."""
    def settled():
        ours = server.ours()
        return (server.is_sleeping() == expect_sleeping
                and states_at_one(ours, OUR_SLEEP, OURS) == [expect_state])

    try:
        wait_for(settled, 10, 0.2, f"{step}: {expect_state}")
    except AssertionError:
        pass
    return sleep_row(server, step)


def check_row(checks: Checks, row: dict, expect_sleeping: str, expect_state: str) -> None:
    step = row["step"]
    checks.add(f"{step}: /is_sleeping is {expect_sleeping}",
               row["is_sleeping"] == expect_sleeping, row["is_sleeping"])
    checks.add(f"{step}: our {OUR_SLEEP} is 1 for {expect_state} alone",
               row["ours"] == [expect_state], ",".join(row["ours"]) or "none at 1")
    if row["vllm_has_gauge"]:
        checks.add(f"{step}: vLLM's {VLLM_SLEEP} is 1 for {expect_state} alone",
                   row["vllm"] == [expect_state], ",".join(row["vllm"]) or "none at 1")


def verify_sleep(server: Server, args, checks: Checks) -> None:
    print(f"\n{'sleep mode':<24}{'is_sleeping':>12}  {'ours at 1':<20}{'vLLM at 1':<20}"
          f"{'ready':>6}{'healthy':>8}")
    check_row(checks, settled_row(server, "before sleeping", "false", "awake"), "false",
              "awake")
    for level in args.sleep_levels:
        state = LEVEL_STATE[level]
        status, body = server.post(f"/sleep?level={level}")
        if not checks.add(f"POST /sleep?level={level} answers 200", status == 200,
                          f"{status} {body}".strip()):
            continue
        check_row(checks, settled_row(server, f"asleep (level {level})", "true", state),
                  "true", state)
        status, body = server.post("/wake_up")
        if not checks.add(f"POST /wake_up after level {level} answers 200", status == 200,
                          f"{status} {body}".strip()):
            continue
        check_row(checks, settled_row(server, f"woken (from level {level})", "false", "awake"),
                  "false", "awake")
        code, tokens = server.complete(prompt(10_000 + level), args.max_tokens)
        checks.add(f"a completion after waking from level {level}",
                   code == 200 and tokens == args.max_tokens, f"HTTP {code}, {tokens} tokens")


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path,
                        help="target model folder (default: the embedded default model)")
    parser.add_argument("--draft-dir", type=Path,
                        help="draft model folder for --method draft_model (default: a new "
                             "temporary folder); built when it has no config.json")
    parser.add_argument("--build-draft", action="store_true",
                        help="(re)write the draft model folder even if it exists")
    parser.add_argument("--method", choices=("draft_model", "ngram"), default="draft_model")
    parser.add_argument("--num-spec-tokens", type=int, default=3)
    parser.add_argument("--no-sleep", action="store_true",
                        help="no enable_sleep_mode and no sleep checks (the CPU build has no "
                             "sleep mode)")
    parser.add_argument("--without-sleep-mode", action="store_true",
                        help="call /sleep and /wake_up without enable_sleep_mode: the CPU build "
                             "refuses that flag, and its worker's sleep is a no-op that frees "
                             "nothing, but vLLM's server still pauses the engine and reports the "
                             "state to the stat loggers (checks the bookkeeping path only)")
    parser.add_argument("--sleep-levels", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--port", type=int, help="API port (default: a free one)")
    parser.add_argument("--metrics-port", type=int, help="metrics port (default: a free one)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds allowed for the daemon's start")
    parser.add_argument("--work-dir", type=Path,
                        help="the daemon's log goes here (default: a new temporary folder)")
    args = parser.parse_args()

    if args.target is None:
        from exporter.default_model import ensure_default_model

        args.target = ensure_default_model()
    args.target = args.target.resolve()
    args.port = args.port or free_port()
    args.metrics_port = args.metrics_port or free_port()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="verify-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.method == "draft_model":
        args.draft_dir = (args.draft_dir or work / "draft").resolve()
        if args.build_draft or not (args.draft_dir / "config.json").is_file():
            build_draft(args.target, args.draft_dir)
        else:
            print(f"draft model: {args.draft_dir} (as it is)")
    spec = speculative_config(args)
    command = daemon_command(args, spec)
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_SERVER_DEV_MODE="1")
    log = work / "daemon.log"
    print("target:", args.target)
    print("daemon:", " ".join(command))
    print("log:", log, flush=True)

    checks = Checks()
    server = Server(f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.metrics_port}")
    began = time.monotonic()
    process = start_group(command, log, env)
    try:
        try:
            wait_url(server.metrics + "/-/ready", process, args.timeout, log, what="the daemon",
                     interval=1)
            wait_url(server.api + "/health", process, 60, log, what="vLLM's API", interval=1)
        except (RuntimeError, AssertionError) as exc:
            checks.add("the daemon starts", False, str(exc).splitlines()[0])
            print("\nthe daemon did not start; error lines of its log:\n" + error_lines(log))
            print("\nlast lines of its log:\n" + log_tail(log, 25))
            return 2
        checks.add("the daemon starts", True, f"ready after {time.monotonic() - began:.0f} s")
        verify_spec_decode(server, args, checks)
        if not args.no_sleep:
            if args.without_sleep_mode:
                print("\n(no enable_sleep_mode: the engine's memory is not released; on the CPU "
                      "build the worker's sleep and wake_up are no-ops)")
            verify_sleep(server, args, checks)
    finally:
        code = stop_group(process)
        server.http.close()
        print(f"\ndaemon stopped: exit code {code}")
        passed = checks.report()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
