"""``opa-telemetry-loadtest``: many concurrent simulated OPA reporters against one server.

One module a job:

- :mod:`.target`: the target URL, and the refusal of any address outside loopback;
- :mod:`.fleet`: the simulated fleet, as request bytes built once with the client's payload code;
- :mod:`.wire`: a minimal HTTP/1.1 client, fast enough to outrun the server it measures;
- :mod:`.runner`: closed and open loops, one or several processes, the merged measurements;
- :mod:`.cli`: arguments, the summary, the exit status.

It needs the ``loadtest`` extra (HdrHistogram) and never imports or reads the server package.
"""

from .cli import build_parser, config_from_args, main
from .fleet import build_requests, check_request
from .runner import LoadConfig, Result, run_load, run_processes
from .target import LoadTestError, Target, check_loopback, parse_target

__all__ = [
    "LoadConfig",
    "LoadTestError",
    "Result",
    "Target",
    "build_parser",
    "build_requests",
    "check_loopback",
    "check_request",
    "config_from_args",
    "main",
    "parse_target",
    "run_load",
    "run_processes",
]
