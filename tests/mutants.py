"""Mutation testing with mutmut: break the code one small change at a time and count the changes the tests
catch, per module. `make mutants` runs it; `python -m tests.mutants serve/gateway/ratelimit.py ...` runs a
few modules. Not part of `make test`: it takes the better part of an hour on two cores.

mutmut imports the mutated copy by its module name, which it derives from the file's path under `src/`.
The repository installs serve/, models/ and loadtests/ as deploykit.serve, deploykit.models and
deploykit.loadtests, so the run happens in a staging tree laid out as installed (.cache/mutants/src/
deploykit/...). Subprocesses that tests start (the CLI, the fake serve runner) get PYTHONPATH pointing at
the mutated copy (tests/conftest.py) and inherit the mutant under test from the environment, so they run
it too; but mutmut learns which tests reach a function only in the test process, so code that runs only
in a subprocess counts as "no test" (tests/integration/test_serve_in_process.py exists for that).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGING = REPO / ".cache" / "mutants"
# The modules whose bugs cost users most (issue #20), as paths in the repository.
MODULES = (
    "serve/gateway/*.py",
    "serve/accounting/*.py",
    "serve/supervisor.py",
    "serve/runner.py",
    "loadtests/metrics.py",
    "loadtests/request.py",
    "sizing/performance.py",
    "sizing/ranking.py",
    "sizing/calibration.py",
    "sizing/cost.py",
    "models/hub.py",
)
# Installed name of each top-level source folder.
_PACKAGES = {
    "deploykit": "deploykit",
    "serve": "deploykit/serve",
    "models": "deploykit/models",
    "loadtests": "deploykit/loadtests",
    "sizing": "deploykit/sizing",
    "infra": "deploykit/infra",
}
# The tests a mutant is checked against (mutmut picks those that reach the mutated function in the test
# process). Left out: the integration tests whose point is a subprocess (the serve runner and load generator
# as users start them, two gateways on PostgreSQL): mutmut cannot tell which functions they reach, and
# each would cost seconds per mutant (a PostgreSQL start, say) for the incidental calls it makes here.
TESTS = (
    "tests/unit",
    "tests/integration",
    "--ignore=tests/integration/test_lifecycle.py",
    "--ignore=tests/integration/test_postgres.py",
    "--ignore=tests/integration/test_loadtest.py",
    "--ignore=tests/unit/test_dockerfile.py",  # they read the repository's Dockerfile and docs, not staged
    "--ignore=tests/unit/test_sizing_docs.py",
)
TARGET = 0.85
# Per test, under mutation (pytest-timeout): far above any test's own time, so a test that runs this long
# is stuck on its mutant (and counts as caught).
TEST_TIMEOUT_S = 120


def stage(patterns: list[str]) -> None:
    """A fresh staging tree with the installed layout, the tests, and mutmut's configuration."""
    shutil.rmtree(STAGING, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder, installed in _PACKAGES.items():
        shutil.copytree(REPO / folder, STAGING / "src" / installed, ignore=ignore)
    shutil.copytree(REPO / "tests", STAGING / "tests", ignore=ignore)
    only = [f"src/{_installed(p)}" for p in patterns]
    config = (
        (REPO / "pyproject.toml").read_text()
        + "\n[tool.mutmut]\n"
        + "\n".join(
            [
                'source_paths = ["src"]',
                f"only_mutate = {json.dumps(only)}",
                f"pytest_add_cli_args_test_selection = {json.dumps(list(TESTS))}",
                # A mutant that spins the event loop (a `while` whose exit never comes) would run until
                # mutmut's CPU limit, thirty times the tests' own time: minutes. Caught either way; pytest's
                # per-test timeout catches it sooner in the test's own thread (not in a thread serving the
                # gateway: the process cannot exit while that spins).
                f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x", "--timeout", "{TEST_TIMEOUT_S}"]',
            ]
        )
    )
    (STAGING / "pyproject.toml").write_text(config + "\n")


def _installed(path: str) -> str:
    top, _, rest = path.partition("/")
    return f"{_PACKAGES[top]}/{rest}" if rest else _PACKAGES[top]


def run(max_children: int, only: list[str]) -> int:
    # A mutant that drops a cache_dir argument downloads into the default HF cache, where later mutants would
    # find the files and survive: each run gets a cache of its own, never the user's.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HOME": str(STAGING / "hf-home")}
    log = STAGING / "mutmut.log"
    mutmut = Path(sys.executable).with_name("mutmut")
    with log.open("a") as out:
        command = [str(mutmut), "run", "--max-children", str(max_children), *only]
        code = subprocess.run(command, cwd=STAGING, env=env, stdout=out, stderr=out).returncode
    print(f"mutmut exited {code}; its log: {log}")
    return code


def scores() -> dict[str, Counter[str]]:
    """Per source file: how many mutants were killed, survived, had no test, timed out..."""
    from mutmut.stats import status_by_exit_code

    by_file: dict[str, Counter[str]] = {}
    for meta in sorted((STAGING / "mutants" / "src").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        name = str(meta.relative_to(STAGING / "mutants" / "src")).removesuffix(".meta")
        by_file[_repo_path(name)] = Counter(status_by_exit_code[c] for c in codes.values())
    return by_file


def _repo_path(installed: str) -> str:
    for folder, prefix in sorted(_PACKAGES.items(), key=lambda kv: -len(kv[1])):
        if installed.startswith(prefix + "/"):
            return installed.replace(prefix, folder, 1)
    return installed


def report(by_file: dict[str, Counter[str]], rechecked: Counter[str], kinds: dict[str, Counter[str]]) -> str:
    """A Markdown table per module. Score: killed (by the run or the recheck) / (mutants - equivalent), where
    equivalent counts only what `survivor_kinds` proves so (an SQL literal's case): every other survivor
    and every mutant no test reached count against the score."""
    head = "| module | mutants | killed | killed on recheck | survived: logic | text | equivalent | no test | score |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    total: Counter[str] = Counter()
    for name, c in by_file.items():
        row = Counter(c)
        row["rechecked"] = rechecked[name]
        row.update({f"kind {k}": n for k, n in kinds.get(name, Counter()).items()})
        total += row
        lines.append(_row(name, row))
    lines.append(_row("**all**", total))
    return "\n".join(lines)


def _row(name: str, c: Counter[str]) -> str:
    counted = sum(n for k, n in c.items() if not k.startswith(("kind ", "rechecked"))) - c["skipped"] - c["not checked"]
    killed = c["killed"] + c["timeout"] + c["caught by type check"]
    denominator = counted - c["kind equivalent"]
    score = (killed + c["rechecked"]) / denominator if denominator else 0.0
    flag = "" if score >= TARGET else " (below target)"
    return (
        f"| {name} | {counted} | {killed} | {c['rechecked']} | {c['kind logic']} | {c['kind text']} | "
        f"{c['kind equivalent']} | {c['kind no test']} | {score:.0%}{flag} |"
    )


def survivors() -> list[str]:
    """`mutmut results`: the mutants no test caught, by name (show one with `mutmut show NAME` in the staging dir)."""
    mutmut = Path(sys.executable).with_name("mutmut")
    result = subprocess.run([str(mutmut), "results"], cwd=STAGING, capture_output=True, text=True)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def recheck(names: list[str], timeout_s: float = 300) -> list[str]:
    """Run each surviving mutant against the whole test files that reach its function or import its module,
    as the tests are now (copied into the staging tree first: tests written for a run's survivors count);
    returns those that still survive. mutmut runs a mutant only against the tests it saw reach the function,
    and it credits a module- or session-scoped fixture's calls to the one test that set the fixture up, and a
    subprocess's calls to no test at all. One at a time: tests that time themselves fail beside another run.
    The verdicts found here are reported beside mutmut's, not written into its data (and logged as they come,
    for an interrupted recheck); the staged source is the run's, so the code must not have changed since."""
    shutil.rmtree(STAGING / "mutants" / "tests", ignore_errors=True)
    shutil.copytree(REPO / "tests", STAGING / "mutants" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    stats = json.loads((STAGING / "mutants" / "mutmut-stats.json").read_text())["tests_by_mangled_function_name"]
    env = {**os.environ, "PYTHONPATH": str(STAGING / "mutants" / "src"), "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HOME": str(STAGING / "hf-home")}  # fmt: skip

    def survives(name: str) -> bool:
        function = name.rsplit("__mutmut_", 1)[0]
        # the files whose tests reached it in the run, and those that import its module: a test written
        # since may sit in a file that did not reach it then
        files = sorted({test.split("::")[0] for test in stats.get(function, ())} | set(_importers(name)))
        if not files:
            return True
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        try:
            result = subprocess.run(
                [*command, *(f"mutants/{f}" for f in files)],
                cwd=STAGING,
                env={**env, "MUTANT_UNDER_TEST": name},
                capture_output=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return False  # a mutant that hangs the tests is caught (mutmut counts a timeout as killed)
        return result.returncode == 0

    alive = []
    for name in names:
        verdict = survives(name)
        print(f"recheck: {name}: {'survived' if verdict else 'killed'}", flush=True)
        if verdict:
            alive.append(name)
    return alive


def _importers(mutant: str) -> list[str]:
    """For a mutant mutmut saw no test reach (its function runs only where mutmut's tracing does not look,
    e.g. in a thread the gateway starts, or only in the files the run leaves out for their cost, such as
    PostgreSQL's): the test files that import its module."""
    dotted = mutant.split(".x")[0].split(".xǁ")[0]
    selected = [t for t in TESTS if not t.startswith("--")]
    files = {str(f.relative_to(REPO)) for folder in selected for f in (REPO / folder).rglob("test_*.py")}
    return sorted(f for f in files if dotted in (REPO / f).read_text())


_STRING = re.compile(r"""[rbuf]*("[^"\\]*(?:\\.[^"\\]*)*"|'[^'\\]*(?:\\.[^'\\]*)*')""", re.IGNORECASE)


def survivor_kinds(names: list[str], untested: list[str]) -> dict[str, Counter[str]]:
    """Per module, the mutants still alive by kind: 'equivalent' when the mutation only changed the case of
    an SQL statement (SQLite and PostgreSQL read keywords and unquoted names in any case), 'text' when it
    only changed, emptied or removed a string literal (a message, a hint, a label: what people read),
    'logic' otherwise, and 'no test' for those `untested` (no test reached them, even on recheck)."""
    sys.path.insert(0, str(STAGING))
    cwd = os.getcwd()
    os.chdir(STAGING)
    try:
        from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant

        kinds: dict[str, Counter[str]] = {}
        for name in names:
            module = _repo_path(str(find_mutant(name).path.relative_to("src")))
            if name in untested:
                kinds.setdefault(module, Counter())["no test"] += 1
                continue
            diff = get_diff_for_mutant(name, path=find_mutant(name).path)
            old = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
            new = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
            kinds.setdefault(module, Counter())[kind_of(old, new)] += 1
        return kinds
    finally:
        os.chdir(cwd)


_SQL_START = "SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|BEGIN|COMMIT|ROLLBACK|PRAGMA|ON CONFLICT"
# Our SQL is written with its keywords in capitals: a sentence that starts "Update the lock" is not SQL.
_SQL = re.compile(rf"""^[rbuf]*["']({_SQL_START})\b""")


def kind_of(old: list[str], new: list[str]) -> str:
    """'equivalent', 'text' or 'logic' for a mutation from the `old` lines to the `new` ones."""
    before, after = " ".join(old), " ".join(new)
    same_code = _STRING.sub("S", before) == _STRING.sub("S", after)  # only literals differ
    if before != after and before.lower() == after.lower() and same_code:
        changed = [m.group(0) for m in _STRING.finditer(before) if m.group(0) not in after]
        if changed and all(_SQL.match(literal) for literal in changed):
            return "equivalent"
    return "text" if _only_text(old, new) else "logic"


def _module_of(mutant: str) -> str:
    """serve/gateway/server.py for deploykit.serve.gateway.server.x__limited_protocol__mutmut_70."""
    dotted = mutant.split(".x")[0].split(".xǁ")[0]
    return _repo_path(dotted.replace(".", "/") + ".py")


def _only_text(old: list[str], new: list[str]) -> bool:
    def bare(lines: list[str]) -> str:
        text = _STRING.sub("S", " ".join(lines))
        return re.sub(r"\bNone\b|S|[\s,()]", "", text)

    return bool(_STRING.search(" ".join(old))) and bare(old) == bare(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="repository paths or globs (default: the modules of issue #20)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--report-only", action="store_true", help="print the scores of the last run")
    parser.add_argument(
        "--recheck",
        nargs="+",
        metavar="MODULE",
        help="after the run, check these modules' survivors against whole test files (see recheck())",
    )
    parser.add_argument("--resume", action="store_true", help="go on with an interrupted run (same code, same modules)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="only the mutants whose names match, e.g. 'deploykit.models.hub.x_pull__*' (one function's)",
    )
    args = parser.parse_args()
    if not args.report_only:
        started = time.monotonic()
        if not args.resume:
            stage(args.modules or list(MODULES))
        run(args.max_children, args.only)
        print(f"{(time.monotonic() - started) / 60:.0f} minutes")
    left = survivors()
    survived = [line.split(":")[0] for line in left if line.endswith(": survived")]
    untested = [line.split(":")[0] for line in left if line.endswith(": no tests")]
    killed_on_recheck: Counter[str] = Counter()
    if args.recheck:
        chosen = [n for n in survived + untested if any(fnmatch.fnmatch(_module_of(n), p) for p in args.recheck)]
        alive = set(recheck(chosen))
        killed_on_recheck.update(_module_of(n) for n in chosen if n not in alive)
        survived = [n for n in survived if n not in set(chosen) - alive]
        untested = [n for n in untested if n not in set(chosen) - alive]
    print(report(scores(), killed_on_recheck, survivor_kinds(survived + untested, untested)))
    print(f"\n{len(survived) + len(untested)} mutants alive (in {STAGING}: mutmut show NAME):")
    print("\n".join(survived + untested))


if __name__ == "__main__":
    main()
