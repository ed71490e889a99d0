"""vllm-exporter: runs a vLLM engine and exports what matters about it to Prometheus."""

__version__ = "0.1.0"
