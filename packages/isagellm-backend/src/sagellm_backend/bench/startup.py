"""Start-up cost: ``get_backend("mock")`` in a fresh interpreter against a bare interpreter.

What a command or a test pays before its first KV block: the import of the package, the
discovery of the installed backends and the creation of a provider. The baseline is the same
interpreter starting and exiting with nothing to do (``python -c pass``), so the ratio is the
package's share of a start. Both run as fresh processes with this process's interpreter and
environment, alternately, and the medians are compared.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

__all__ = ["BARE", "OURS", "startup_case"]

BARE = "pass"
OURS = "from sagellm_backend import get_backend; get_backend('mock').close()"


def startup_case(processes: int) -> tuple[float, float]:
    """Median seconds of a fresh ``get_backend("mock")`` and of a bare interpreter, each run
    ``processes`` times, alternately."""
    times: dict[str, list[float]] = {BARE: [], OURS: []}
    for _ in range(processes):
        for code, samples in times.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            samples.append(time.perf_counter() - started)
    return statistics.median(times[OURS]), statistics.median(times[BARE])
