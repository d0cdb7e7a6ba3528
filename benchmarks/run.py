"""``python -m benchmarks``: measure every figure and its floor, print the table, write JSON.

Options: ``--quick`` (tiny sizes: checks that everything runs, the numbers
mean nothing), ``--only NAME[,NAME]`` (cli, launch, stored, hashing, git,
multiprocess), ``--stored N`` (experiments in the big storage), ``--output
FILE`` (default ``benchmarks/results/<time>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import fixtures
from benchmarks.figures import ALL, Context, Sizes
from benchmarks.harness import REPO, Figure, machine, table, unavailable

RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ALL)}")
    parser.add_argument("--stored", type=int, default=None, help="experiments in the big storage (default 100,000)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and the cached storage go")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)

    sizes = Sizes.quick() if args.quick else Sizes()
    if args.stored is not None:
        sizes.stored = args.stored
    if args.quick:
        fixtures.SETTLE_SECONDS = 0
    selected = [name.strip() for name in args.only.split(",") if name.strip()] or list(ALL)
    unknown = [name for name in selected if name not in ALL]
    if unknown:
        parser.error(f"unknown figure group(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    args.results.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    _compile_bytecode(log)
    figures: list[Figure] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="machinable-bench-") as tmp:
        ctx = Context(sizes=sizes, work=Path(tmp), results=args.results, log=log)
        try:
            for name in selected:
                log(f"[{name}] ...")
                t = time.time()
                try:
                    figures += ALL[name](ctx)
                except Exception as e:  # one broken group must not hide the others
                    traceback.print_exc()
                    figures.append(unavailable(f"[{name}]", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                log(f"[{name}] {time.time() - t:.0f} s")
        finally:
            fixtures.remove_tree(Path(tmp))

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['filesystem']}, "
          f"Python {info['python']}, {info['git']}, machinable @ {info['machinable_commit']}")
    print(table(figures))
    output = args.output or args.results / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": info, "quick": args.quick, "seconds": time.time() - started,
                                  "sizes": vars(sizes), "figures": [f.as_json() for f in figures]}, indent=2))
    print(f"\nwritten: {output}")
    return 1 if any(not f.available and f.name.startswith("[") for f in figures) else 0


def _compile_bytecode(log) -> None:  # noqa: ANN001
    """Compile machinable's modules as installing it would (pip writes the .pyc files).

    A checkout run with PYTHONDONTWRITEBYTECODE=1 (or one just edited) would
    otherwise compile every module at every start, and the CLI start figure
    would measure the compiler instead of machinable.
    """
    import compileall

    import machinable

    package = Path(machinable.__file__).parent
    if not compileall.compile_dir(str(package), quiet=1):
        log(f"note: could not compile {package}; start-up figures include compiling")


if __name__ == "__main__":
    raise SystemExit(main())
