"""``python -m benchmarks``: run the benchmark suites, or re-render BENCHMARKS.md.

    python -m benchmarks run --suite quick|full|smoke --out DIR [--only a,b] [--markdown PATH | --no-markdown]
    python -m benchmarks render DIR/bench.json [MORE/bench.json ...] [--markdown PATH]
    python -m benchmarks list

``run`` writes DIR/bench.json and regenerates the block of that suite in BENCHMARKS.md.
``render`` regenerates it from saved bench.json files of one suite (merged, later wins),
e.g. a full run assembled from separate runs of its suites. Exit status: 0 when every
suite ran, 1 when one is missing or raised (the others still ran and are recorded),
2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import harness
from fedmq.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run suites, write DIR/bench.json and regenerate BENCHMARKS.md")
    r.add_argument("--suite", required=True, choices=harness.MODES)
    r.add_argument("--out", required=True, help="folder for bench.json (created if missing)")
    r.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(harness.suite_names())}")
    r.add_argument("--markdown", default=str(harness.DEFAULT_MARKDOWN), help="Markdown file to regenerate")
    r.add_argument("--no-markdown", action="store_true", help="leave Markdown alone")
    r.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    g = sub.add_parser("render", help="regenerate BENCHMARKS.md from bench.json files of one suite")
    g.add_argument("bench", nargs="+", help="bench.json files, merged in order (later suites win)")
    g.add_argument("--markdown", default=str(harness.DEFAULT_MARKDOWN))
    sub.add_parser("list", help="list the suites")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for s in harness.SUITES:
                print(f"{s.name:10s} {s.module:24s} {s.title}")
            return 0
        if args.command == "render":
            doc = harness.merge_bench([harness.load_bench(b) for b in args.bench])
            harness.update_markdown(args.markdown, doc)
            print(f"regenerated the {doc['suite']} block of {args.markdown}")
            return 0
        only = [n.strip() for n in args.only.split(",") if n.strip()] or None
        doc = harness.run_suites(args.suite, args.out, only=only,
                                 markdown=None if args.no_markdown else args.markdown,
                                 threads=args.threads or None, log=harness.main_log)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [n for n, e in doc["suites"].items() if e["status"] in ("error", "missing")]
    print(f"wrote {args.out}/bench.json ({doc['seconds']:.1f} s)"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
