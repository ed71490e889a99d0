"""The command line: `vllm-exporter serve | check-config | docs ...`.

Flags override the YAML config file; every flag is documented in docs/configuration.md.
Exit codes: 0 success, 1 the engine died, 2 bad input (config, flags, ports, model path).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

import yaml

from .advice.cli import add_advise_parser, run_advise
from .alerts import prepare_alerts
from .alerts.cli import add_rules_parser, run_rules
from .dashboards.cli import add_dashboards_parser, run_dashboards
from .config import ConfigError, load_config
from .engine_settings import SETTABLE
from .tuning.cli import TUNING_COMMANDS, add_tuning_parsers, run_tuning

SERVE_EPILOG = """examples:
  vllm-exporter serve                                  # the embedded default model
  vllm-exporter serve --config /etc/vllm-exporter/config.yaml
  vllm-exporter serve --model /models/llama-3-8b-awq --quantization awq \\
      --gpu-memory-utilization 0.9 --max-model-len 8192 --metrics-port 9410 \\
      --engine-arg max_loras=4
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-exporter",
        description="Run a vLLM engine and export its metrics to Prometheus.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the engine, the API and the metrics port",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(serve)

    check = sub.add_parser("check-config", help="validate a config file and exit",
                           epilog="example:\n  vllm-exporter check-config --config config.yaml",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(check)

    add_rules_parser(sub)
    add_tuning_parsers(sub)
    add_dashboards_parser(sub)
    add_advise_parser(sub)

    docs = sub.add_parser("docs", help="generate reference docs from the code")
    docs.add_argument("what", choices=["metrics"])
    docs.add_argument("--out", help="write here instead of standard output")
    docs.add_argument("--check", action="store_true",
                      help="exit 1 if --out differs from what the code generates")
    return parser


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    engine = p.add_argument_group("engine (overrides the config's engine section)")
    for setting in SETTABLE:  # booleans get --x / --no-x
        if setting.type is bool:
            engine.add_argument(setting.flag, dest=setting.config_key,
                                action=argparse.BooleanOptionalAction, default=None)
        else:
            engine.add_argument(setting.flag, dest=setting.config_key, type=setting.type,
                                default=None)
    engine.add_argument("--engine-arg", dest="engine_args", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="any other vLLM engine/server argument (repeatable; VALUE is YAML)")
    listen = p.add_argument_group("listening")
    listen.add_argument("--host", dest="api.host", default=None, help="API host (127.0.0.1)")
    listen.add_argument("--port", dest="api.port", type=int, default=None, help="API port (8000)")
    listen.add_argument("--metrics-host", dest="metrics.host", default=None,
                        help="metrics host (127.0.0.1)")
    listen.add_argument("--metrics-port", dest="metrics.port", type=int, default=None,
                        help="metrics port (9410)")
    listen.add_argument("--web-config-file", dest="metrics.web_config_file", default=None,
                        metavar="FILE",
                        help="TLS and basic auth for the metrics port (exporter-toolkit format; "
                             "reloaded on SIGHUP)")
    p.add_argument("--log-level", dest="daemon.log_level", default=None,
                   help="DEBUG, INFO, WARNING or ERROR")


def config_from_args(args: argparse.Namespace):
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items()
                                 if "." in k and v is not None}
    config = load_config(args.config, overrides)
    for item in args.engine_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("command line", "--engine-arg", f"expected KEY=VALUE, got {item!r}")
        config.engine.extra_args[key.strip()] = yaml.safe_load(value)
    for field, problem in config.engine.extra_args_problems():
        raise ConfigError("command line", f"engine.{field}", problem)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "docs":
            from .docs import run_docs

            return run_docs(args.what, args.out, args.check)
        if args.command == "rules":
            return run_rules(args)
        if args.command == "dashboards":
            return run_dashboards(args)
        if args.command == "advise":
            return run_advise(args)
        if args.command in TUNING_COMMANDS:
            return run_tuning(args)
        config = config_from_args(args)
        alerts = prepare_alerts(config)  # validates the rule file too
        if args.command == "check-config":
            print(f"{args.config or '<defaults>'}: OK")
            return 0
        logging.basicConfig(level=config.daemon.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from .daemon import StartupError, serve

        try:
            return serve(config, alerts)
        except StartupError as exc:
            print(f"vllm-exporter: {exc}", file=sys.stderr)
            return 2
    except ConfigError as exc:
        print(f"vllm-exporter: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
