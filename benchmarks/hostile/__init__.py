"""Hostile input: proof that ``nextword serve`` is safe to expose to strangers.

    python -m benchmarks.hostile [--bundle models/demo] [--requests 10000] [--seed 0]
                                 [--json OUT] [--results benchmarks/RESULTS.md]

(run from the repository root). It starts a real ``nextword serve`` on a free
loopback port (its log in a file), asks it a few reference questions, then sends
``--requests`` hostile RPCs with ``--concurrency`` in flight, asks the reference
questions again and judges the server:

* no UNKNOWN and no INTERNAL status (a refusal names its reason: INVALID_ARGUMENT,
  NOT_FOUND, RESOURCE_EXHAUSTED, ...), and no traceback in its log;
* health SERVING after, the reference answers identical (words and probabilities);
* RSS after at most 1.25× RSS before.

It exits 1 when a goal is missed. The requests are drawn by hypothesis from a
fixed seed (the same requests every run), every kind in proportion
(``attacks.WEIGHTS``): Predict and Session with odd, huge, control-character and
near-surrogate text; invalid UTF-8, corrupt protobuf wire bytes, truncated and
lying length prefixes; forged, overlong and mangled session ids, and other
streams' ids resumed; extreme and negative k; unknown model names; reset storms;
streams that send nothing, close at once or are cancelled at odd points;
oversized and gzip-inflated messages; GetModelInfo, health Check/List/Watch,
reflection and methods that do not exist. Every message is sent as raw bytes
through a generic channel, so what reaches the server is exactly what was drawn.

Modules, one role each: ``wire`` (protobuf wire format by hand), ``strategies``
(hypothesis strategies for text, k, names and corrupt bytes), ``attacks`` (the
kinds and drawing them), ``runner`` (sending them), ``server`` (the subprocess,
its RSS and log), ``reference`` (answers before and after, health), ``report``
(counts, goals, text and markdown), ``cli`` (the command).
"""
