"""Mutants checked by hand: `python -m tests.mutants_by_hand [MODULE...]` applies each change listed in
tests/mutants_by_hand.json to the module in place, runs the tests meant to catch it, and restores the file.
It backs the "by hand" figures in docs/TESTING.md: survivors of a mutation run that a test written since
kills, without rerunning mutmut for an hour. A control run with no change comes first and must pass, so
that a broken test cannot pass for a kill. Run it on a clean tree: it rewrites source files while it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = Path(__file__).with_suffix(".json")


def check(module: str, tests: list[str], cases: list[dict[str, str]]) -> list[str]:
    """Apply each case in turn and run its tests; prints each verdict and returns the cases that survived.
    Exits if the control run (no change) fails or a case's code is gone."""
    path = REPO / module
    original = path.read_text()

    def passes(select: str) -> bool:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", select]
        return subprocess.run(command, cwd=REPO, capture_output=True, timeout=600).returncode == 0

    if not passes(" or ".join(f"({c['select']})" for c in cases)):
        raise SystemExit(f"{module}: the tests fail with no change; fix them first")
    survived = []
    try:
        for case in cases:
            if case["old"] not in original:
                raise SystemExit(f"{module}: {case['name']}: the code it changes is gone; update {CASES.name}")
            path.write_text(original.replace(case["old"], case["new"], 1))
            alive = passes(case["select"])
            note = f" ({case['note']})" if "note" in case else ""
            print(f"{module}: {case['name']}: {'SURVIVED' if alive else 'killed'}{note}", flush=True)
            if alive:
                survived.append(case["name"])
    finally:
        path.write_text(original)
    return survived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="repository paths (default: every module in the file)")
    args = parser.parse_args()
    listed = json.loads(CASES.read_text())
    survived = [
        f"{module}: {name}"
        for module in args.modules or list(listed)
        for name in check(module, listed[module]["tests"], listed[module]["cases"])
    ]
    if survived:  # each listed case is one a test was written to kill
        raise SystemExit("survived, though a test was written for each:\n" + "\n".join(survived))


if __name__ == "__main__":
    main()
