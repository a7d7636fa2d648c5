"""docs/reliability.md's guarantee table names tests that exist (a renamed or deleted test fails here)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _table_rows() -> list[str]:
    text = DOC.read_text()
    section = text.split("## What is guaranteed, and the test that checks it", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]


def test_every_guarantee_names_a_test():
    rows = _table_rows()
    assert len(rows) >= 15
    assert [row for row in rows if not NAMED.search(row)] == []


def test_every_named_test_exists():
    missing = []
    for row in _table_rows():
        for path, name in NAMED.findall(row):
            source = REPO / path
            if not source.exists() or not re.search(rf"^def {name}\(", source.read_text(), re.MULTILINE):
                missing.append(f"{path}::{name}")
    assert missing == []
