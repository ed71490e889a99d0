"""Configuration: YAML + flags, and every bad-input case ending with exit 2 before the engine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.config import ConfigError, load_config
from exporter.daemon import vllm_argv

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    config = load_config(write(tmp_path, """
engine:
  max_model_len: 1024
  enable_prefix_caching: false
  gpu_memory_utilization: 0.85
  extra_args: {max_loras: 4}
metrics: {port: 9555}
histogram_buckets:
  time_to_first_token: [0.1, 0.5, 1]
"""))
    assert config.engine.max_model_len == 1024
    assert config.engine.enable_prefix_caching is False
    assert config.engine.gpu_memory_utilization == 0.85
    assert config.metrics.port == 9555 and config.metrics.host == "127.0.0.1"
    assert config.api.port == 8000
    assert config.buckets()["time_to_first_token"] == (0.1, 0.5, 1.0)
    argv = vllm_argv(config, "/m", "name")
    assert argv[argv.index("--max-model-len") + 1] == "1024"
    assert "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--max-loras") + 1] == "4"
    assert "--quantization" not in argv  # unset knobs are left to vLLM's defaults


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "engine: {max_num_seqs: 8}\nmetrics: {port: 9555}\n")
    from exporter.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--config", str(path), "--max-num-seqs", "64",
                                      "--metrics-port", "9600", "--no-enable-chunked-prefill",
                                      "--engine-arg", "swap_space=2"])
    config = config_from_args(args)
    assert config.engine.max_num_seqs == 64
    assert config.metrics.port == 9600
    assert config.engine.enable_chunked_prefill is False
    assert config.engine.extra_args == {"swap_space": 2}


@pytest.mark.parametrize("text, field, words", [
    ("engine: {max_modl_len: 5}", "engine.max_modl_len", "unknown key"),
    ("bogus: 1", "bogus", "unknown key"),
    ("engine: {max_model_len: '512'}", "engine.max_model_len", "must be an integer"),
    ("engine: {enable_prefix_caching: 'yes'}", "engine.enable_prefix_caching", "true or false"),
    ("engine: {gpu_memory_utilization: 1.2}", "engine.gpu_memory_utilization", "(0, 1]"),
    ("engine: {gpu_memory_utilization: 0}", "engine.gpu_memory_utilization", "(0, 1]"),
    ("metrics: {port: -1}", "metrics.port", "0-65535"),
    ("api: {port: 70000}", "api.port", "0-65535"),
    ("engine: {max_num_seqs: 0}", "engine.max_num_seqs", "positive"),
    ("engine: {model: /no/such/model}", "engine.model", "does not exist"),
    ("histogram_buckets: {time_to_first_token: [1, 0.5]}", "histogram_buckets.time_to_first_token",
     "increasing"),
    ("histogram_buckets: {nope: [1]}", "histogram_buckets.nope", "unknown histogram group"),
    ("daemon: {idle_timeout_seconds: 0}", "daemon.idle_timeout_seconds", "> 0"),
    ("slo: {objectives: [{name: x, signal: ttft}]}", "slo.objectives[0].signal", "must be one of"),
    ("engine: [1, 2]", "engine", "must be a mapping"),
    ("api: {port: 9000}\nmetrics: {port: 9000}", "metrics.port", "must differ"),
    # process topologies the daemon cannot run (docs/topologies.md)
    ("engine: {api_server_count: 0}", "engine.api_server_count", "positive"),
    ("engine: {data_parallel_size: -1}", "engine.data_parallel_size", "positive"),
    ("engine: {extra_args: {api-server-count: 2}}", "engine.extra_args.api_server_count",
     "set engine.api_server_count instead"),
    ("engine: {extra_args: {data_parallel_size: 2}}", "engine.extra_args.data_parallel_size",
     "set engine.data_parallel_size instead"),
    ("engine: {extra_args: {headless: true}}", "engine.extra_args.headless", "serves no API"),
    # a second value for a setting the daemon passes itself (vLLM would take the last one)
    ("engine: {extra_args: {served-model-name: x}}", "engine.extra_args.served_model_name",
     "set engine.served_model_name instead (flag --served-model-name"),
    ("engine: {extra_args: {max_model_len: 512}}", "engine.extra_args.max_model_len",
     "set engine.max_model_len instead"),
    ("engine: {extra_args: {port: 8005}}", "engine.extra_args.port", "set api.port instead"),
    ("engine: {data_parallel_size: 2, extra_args: {data_parallel_size_local: 4}}",
     "engine.extra_args.data_parallel_size_local", "exceed data_parallel_size 2"),
    ("engine: {api_server_count: 2, extra_args: {data_parallel_external_lb: true}}",
     "engine.api_server_count", "external load balancing"),
])
def test_bad_values_name_file_field_and_problem(tmp_path, text, field, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.field_path == field
    assert words in caught.value.problem


def test_model_directory_without_config_json(tmp_path):
    (tmp_path / "weights").mkdir()
    path = write(tmp_path, f"engine: {{model: {tmp_path / 'weights'}}}")
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "engine: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "absent.yaml")


def test_check_config_exit_codes(tmp_path, capsys):
    good = write(tmp_path, "engine: {max_model_len: 512}")
    assert main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {gpu_memory_utilization: 3}")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "engine.gpu_memory_utilization" in err and "(0, 1]" in err


def test_topology_flags_and_engine_args(tmp_path, capsys):
    args = ["check-config", "--api-server-count", "2", "--data-parallel-size", "2"]
    assert main(args) == 0
    assert main(["check-config", "--engine-arg", "api_server_count=2"]) == 2
    err = capsys.readouterr().err
    assert "engine.extra_args.api_server_count" in err and "set engine.api_server_count" in err
    assert main(["check-config", "--engine-arg", "served_model_name=x"]) == 2
    assert "set engine.served_model_name instead" in capsys.readouterr().err
    assert main(["check-config", "--api-server-count", "0"]) == 2
    assert "engine.api_server_count" in capsys.readouterr().err


def _serve(args: list[str], timeout: float = 120) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "exporter", "serve", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def test_serve_with_bad_config_exits_2_before_the_engine(tmp_path):
    bad = write(tmp_path, "engine: {max_num_seqs: -3}")
    code, output, _ = _serve(["--config", str(bad)])
    assert code == 2
    assert f"{bad}: field 'engine.max_num_seqs': must be a positive integer" in output
    assert "EngineCore" not in output  # nothing was started


def test_serve_with_missing_model_and_bad_flag(tmp_path):
    code, output, _ = _serve(["--model", str(tmp_path / "absent")])
    assert code == 2 and "engine.model" in output and "does not exist" in output
    code, output, _ = _serve(["--max-model-len", "many"])
    assert code == 2 and "--max-model-len" in output


def test_serve_with_a_setting_vllm_refuses_exits_2_with_its_reason():
    """Valid flags that vLLM's config refuses on this platform (the CPU build has no sleep
    mode): one line with vLLM's reason, exit 2, no engine process, no traceback."""
    code, output, _ = _serve(["--engine-arg", "enable_sleep_mode=true", "--port", "0",
                              "--metrics-port", "0"], timeout=180)
    assert code == 2, output
    assert "vLLM refused the engine configuration" in output
    assert "Sleep mode is not supported on current platform" in output
    assert "--engine-arg" in output
    assert "Traceback" not in output and "EngineCore" not in output


@pytest.mark.parametrize("taken_flag, free_flag, field", [
    ("--metrics-port", "--port", "metrics.port"),
    ("--port", "--metrics-port", "api.port"),
])
def test_serve_with_a_port_in_use_exits_2_before_the_engine(taken_flag, free_flag, field):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output, _ = _serve([taken_flag, str(port), free_flag, "0"])
    assert code == 2, output
    assert field in output and str(port) in output
    assert "EngineCore" not in output
