"""RELIABILITY.md stays true: every test its tables name exists (pytest collects it, with its
parametrized id where one is given), every row says what it expects, and every topic of issue 7
has a row."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

DOC = ROOT / "RELIABILITY.md"
REF = re.compile(r"`(tests/[\w/]+\.py::[^`\s\[]+(?:\[[^`]*\])?)`")

# Issue 7, item by item: each needs a row whose first column says it (case-insensitive fragments).
TOPICS = [
    "recipe file missing", "recipe empty", "not a mapping", "yaml syntax", "unknown or misspelt key",
    "wrong type", "learning rate <= 0", "epochs <= 0", "cutoff_len < 16", "empty identity name",
    "run name that would leave", "climbs out", "system folder", "dataset file missing", "dataset not json",
    "dataset empty", "rows missing the required fields", "mixing alpaca and sharegpt", "model directory missing",
    "without config.json", "unknown template", "qlora` without bitsandbytes", "--resume` of a directory that is not",
    "hypothesis", "sigkill of the training child", "ctrl-c during a model download",
    "corrupted or half-written manifest", "a full disk during training", "hf_token", "modelscope_api_token",
    "api key", "without a key on a non-loopback host",
]


def rows() -> list[list[str]]:
    out = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells[:3] != ["input, fault or attack", "expected behaviour", "test"]:
                out.append(cells)
    return out


def test_every_row_has_a_behaviour_and_tests():
    table = rows()
    assert len(table) >= 40
    for cells in table:
        assert len(cells) == 3, cells
        what, expected, tests = cells
        assert what and expected, cells
        assert REF.findall(tests) and not REF.sub("", tests).strip(" ,"), f"not only test references: {tests}"


def test_every_topic_of_the_issue_has_a_row():
    firsts = [cells[0].lower() for cells in rows()]
    missing = [t for t in TOPICS if not any(t in f for f in firsts)]
    assert not missing, missing


def test_every_named_test_exists():
    refs = sorted({ref for cells in rows() for ref in REF.findall(cells[2])})
    files = sorted({ref.split("::")[0] for ref in refs})
    for f in files:
        assert (ROOT / f).is_file(), f
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = {line.strip() for line in r.stdout.splitlines() if "::" in line}
    functions = {i.split("[", 1)[0] for i in ids}
    missing = [ref for ref in refs if ref not in (ids if "[" in ref else functions)]
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"
