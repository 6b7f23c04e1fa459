"""A longer run of the property-based equivalence test: more random small transformers under
more random valid plans (tests/partitioner/test_properties.py draws them), each compared with
the single-device model on gloo CPU ranks, all cases of one world size in one spawn.

Per case it records the plan, the model's fields, pass/fail and the worst relative error
(any rank); it saves JSON and exits non-zero if a case failed. The draws are deterministic
(hypothesis, derandomized): the same counts give the same cases.

    python benchmarks/property_sweep.py [--examples 2=20,4=10] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_examples(text: str) -> dict[int, int]:
    pairs = (item.split("=") for item in text.split(",") if item)
    return {int(world): int(count) for world, count in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="2=20,4=10",
                        help="cases per world size, world=count joined by commas")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "property_sweep.json"))
    args = parser.parse_args(argv)
    # The strategies and the rank worker live with the test (spawned ranks import it by name).
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "partitioner")]
    import test_properties
    from equivalence import equivalence_worker
    from runtime import spawn

    results, failed = [], 0
    for world, count in sorted(_parse_examples(args.examples).items()):
        if not count:
            continue
        start = time.perf_counter()
        cases = test_properties.draw_cases(world, count)
        drawn_s = time.perf_counter() - start
        start = time.perf_counter()
        reports = spawn(world, equivalence_worker, cases)
        run_s = time.perf_counter() - start
        print(f"world {world}: {len(cases)} cases drawn in {drawn_s:.1f} s, run in {run_s:.1f} s")
        for index, case in enumerate(cases):
            per_rank = [rank_reports[index][1] for rank_reports in reports]
            passed = all(report.passed for report in per_rank)
            worst = max(max(report.errors.values()) for report in per_rank)
            failed += not passed
            print(f"  {'PASS' if passed else 'FAIL'} {case[3]}  worst rel.err {worst:.1e}")
            results.append(dict(world=world, plan=case[3], model=case[2], options=case[5],
                                passed=passed, worst_relative_error=worst,
                                tolerance=per_rank[0].tolerance))
        results.append(dict(world=world, cases=len(cases), draw_s=round(drawn_s, 1),
                            run_s=round(run_s, 1)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(dict(examples=args.examples, failed=failed, results=results), handle, indent=1)
    print(f"{failed} failed; saved {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
