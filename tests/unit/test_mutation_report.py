"""How tests/mutants.py classes what survives and scores a module: a score that counted wrongly would make
the figures in docs/TESTING.md wrong."""

from __future__ import annotations

from collections import Counter

from tests.mutants import kind_of, report


def test_only_a_change_of_case_in_sql_is_equivalent() -> None:
    sql = ['    run("SELECT tpm FROM api_keys WHERE id = ?", (key_id,))']
    assert kind_of(sql, ['    run("select tpm from api_keys where id = ?", (key_id,))']) == "equivalent"
    assert kind_of(sql, ['    run("SELECT TPM FROM API_KEYS WHERE ID = ?", (key_id,))']) == "equivalent"
    conflict = ['        "ON CONFLICT (key_id) DO NOTHING",']
    assert kind_of(conflict, ['        "on conflict (key_id) do nothing",']) == "equivalent"
    # anything else that touches SQL is not: a changed statement, an emptied one, other code on the line
    assert kind_of(sql, ['    run("XXSELECT tpm FROM api_keys WHERE id = ?XX", (key_id,))']) == "text"
    assert kind_of(sql, ["    run(None, (key_id,))"]) == "text"
    assert kind_of(sql, ['    RUN("select tpm from api_keys where id = ?", (key_id,))']) == "logic"
    assert kind_of(['    x = "Bearer"'], ['    x = "bearer"']) == "text"  # not SQL: its case may matter
    hint = ['    "Update the lock on purpose.",']  # English that starts with an SQL keyword
    assert kind_of(hint, ['    "update the lock on purpose.",']) == "text"
    assert kind_of(hint, ['    "UPDATE THE LOCK ON PURPOSE.",']) == "text"
    assert kind_of(["    if a > b:"], ["    if a >= b:"]) == "logic"


def test_the_score_counts_recheck_kills_and_leaves_out_only_equivalents() -> None:
    run = {"serve/x.py": Counter({"killed": 80, "timeout": 2, "survived": 15, "no tests": 3, "not checked": 50})}
    kinds = {"serve/x.py": Counter({"logic": 4, "text": 2, "equivalent": 5, "no test": 1})}
    table = report(run, Counter({"serve/x.py": 8}), kinds)
    # 100 checked, 82 + 8 killed, 5 equivalent: 90 / 95
    assert "| serve/x.py | 100 | 82 | 8 | 4 | 2 | 5 | 1 | 95% |" in table.splitlines()
    assert report(run, Counter(), kinds).splitlines()[2].endswith("| 86% |")  # 82 / 95
    assert report(run, Counter(), {}).splitlines()[2].endswith("| 82% (below target) |")
