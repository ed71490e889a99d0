"""pytest skip markers for tests that need Prometheus' binaries (scripts/setup.sh installs
them; Debian's packages prometheus and prometheus-alertmanager)."""

import pytest

from .prometheus import ALERTMANAGER, PROMETHEUS, PROMTOOL

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed "
                                      "(apt-get install prometheus)")
needs_alertmanager = pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager "
                                        "not installed")
