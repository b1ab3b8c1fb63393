"""Run the benchmarks: ``python -m bench [name ...] [--option ...]`` (default: all).

Each ``bench/bench_<name>.py`` has a ``main()`` that prints its own table. Options
after one name go to that benchmark: ``python -m bench adaptation --minutes 1``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )


def main(argv: list[str]) -> int:
    split = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:split] or available(), argv[split:]
    if options and len(names) != 1:
        print("options go to one benchmark: python -m bench NAME --option …", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            if options:
                module.main(options)
            else:
                module.main()
        except Exception as exc:  # keep going: one broken benchmark should not hide the rest
            print(f"benchmark {name} failed: {exc!r}", file=sys.stderr)
            failed.append(name)
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
