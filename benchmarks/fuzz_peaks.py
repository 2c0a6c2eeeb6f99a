"""A pytest plugin that reports the CLI fuzz cases' time and their largest memory peak (docs/reliability.md).

    PYTHONPATH=benchmarks python -m pytest -q -p fuzz_peaks tests/test_cli_fuzz.py -k bad_invocation

It wraps ``test_cli_fuzz._run_bounded`` (which resets and reads the process's peak resident size around each call)
and prints, at the end, how many calls ran, the seconds spent in them and the call that raised the peak most.
"""

from __future__ import annotations

import time

RECORDS: list[tuple[int, float, list[str]]] = []


def pytest_collection_finish(session) -> None:
    import test_cli_fuzz  # the test module, importable once collected (tests/ is on the path)

    measured = test_cli_fuzz._run_bounded

    def recorded(argv: list[str]) -> tuple[int, int]:
        start = time.perf_counter()
        code, peak = measured(argv)
        RECORDS.append((peak, time.perf_counter() - start, argv))
        return code, peak

    test_cli_fuzz._run_bounded = recorded


def pytest_sessionfinish(session) -> None:
    if RECORDS:
        peak, _, argv = max(RECORDS, key=lambda r: r[0])
        print(f"\n{len(RECORDS)} calls, {sum(r[1] for r in RECORDS):.1f} s in the calls; the largest peak, "
              f"{peak / 2**20:.0f} MiB, was added by: latentdiff {' '.join(argv[:3])} ...")
