"""fedmq benchmarks: one module per suite, driven by ``python -m benchmarks``.

Every suite module exposes ``run(quick: bool) -> dict`` (a JSON-serialisable result)
and can be run alone with ``python -m benchmarks.<name>`` (prints that JSON). The
harness (:mod:`benchmarks.harness`) imports each suite, records its result, its
run time or the error it raised in ``bench.json``, and regenerates the tables of
BENCHMARKS.md.

A result dict may carry, besides its measurements:

- ``"tables"``: a list of ``{"title": str, "columns": [str, ...], "rows": [[...], ...]}``,
  rendered verbatim as Markdown tables;
- ``"notes"``: a string or a list of strings, rendered as a bullet list.

Suites without ``"tables"`` are rendered generically (scalars as a key/value table,
lists of dicts as tables). Benchmarks measure; tests never assert their timings.
"""
