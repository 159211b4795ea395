"""``nextword loadtest``: many concurrent typing sessions against a server, with latency percentiles.

Each stream is one ``NextWord.Session``: it types words of a text, one request
(``"word "``) per word, and the server answers each request with one reply.

* Closed loop (default): a stream sends its next word when the previous reply
  arrives; latency is write-to-reply.
* Open loop (``rate``): a stream sends ``rate`` words/s whatever the server
  does; requests pipeline on the stream, and latency is measured from each
  word's *intended* send time, so a server that falls behind shows it in the
  percentiles instead of silently slowing the test down (coordinated omission).

Latencies go into an HDR histogram (1 µs .. 60 s, 3 significant digits).
Only the reply *count* is used, never its contents, so any server of the
``Session`` RPC can be measured (the benchmarks point it at stand-ins too)::

    spec = LoadSpec("127.0.0.1:50051", streams=64, duration=10)
    report = await run_load(spec)
    print(report.to_json_dict())

``run_load_processes(spec, procs=4)`` spreads the streams over several client
processes (one Python process saturates a core long before a server with 256
streams does) and merges their histograms.

The modules, one role each: ``spec`` (what a test runs), ``target`` (loopback
only), ``text`` (the words typed), ``report`` (what it measured), ``engine``
(the streams of one process), ``processes`` (several processes), ``cli`` (the
command).
"""

from __future__ import annotations

from .engine import run_load
from .errors import LoadTestError, TargetUnreachable
from .processes import run_load_processes
from .report import LoadReport
from .spec import LoadSpec
from .target import check_target, is_loopback_target
from .text import load_words

__all__ = [
    "LoadReport",
    "LoadSpec",
    "LoadTestError",
    "TargetUnreachable",
    "check_target",
    "is_loopback_target",
    "load_words",
    "run_load",
    "run_load_processes",
]
