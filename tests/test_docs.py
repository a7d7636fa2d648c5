"""The documentation's links: every relative link and ``#anchor`` in README.md and docs/**/*.md resolves.

Anchors follow GitHub's rule (lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2`` for repeats),
so a link that works here works on the forge. Links inside code blocks and absolute URLs are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), ROOT / "cluster" / "README.md"])

_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML = re.compile(r"<(?:img|a)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    kept, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _slug(heading: str) -> str:
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for the headings of a Markdown file (plus explicit ``id``/``name`` ones)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = _prose(path.read_text())
    return _LINK.findall(text) + _HTML.findall(text)


def _broken(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, s3: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        if not dest.exists():
            problems.append(f"{target}: no file {shown}")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {shown}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    assert links(page) or page.name != "README.md", f"{page}: no links found (is the link pattern broken?)"
    problems = _broken(page)
    assert not problems, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(problems)


def test_anchor_rule_matches_github():
    assert _slug("Concurrent, failed and incremental runs") == "concurrent-failed-and-incremental-runs"
    assert _slug("Unidentified cells and the domain-shift alarm") == "unidentified-cells-and-the-domain-shift-alarm"
    assert _slug("`bloodray query` views") == "bloodray-query-views"
    assert _slug("One GPU box without Ray: the pack trainer") == "one-gpu-box-without-ray-the-pack-trainer"


def test_the_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "b.md").write_text("# Here\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#here) [gone](c.md) [bad](b.md#there) `[code](x.md)`\n```\n[x](y.md)\n```\n")
    problems = _broken(page)
    assert len(problems) == 2 and "c.md" in problems[0] and "#there" in problems[1]


def test_readme_states_the_test_command_and_the_guides():
    text = (ROOT / "README.md").read_text()
    assert "make test" in text and "make demo" in text
    for guide in ["docs/guides/nightly.md", "docs/guides/reviewer.md", "docs/guides/analyst.md",
                  "docs/guides/ml-engineer.md", "docs/reliability.md", "cluster/README.md"]:
        assert f"]({guide}" in text, f"README.md does not link {guide}"
    assert len(text.splitlines()) <= 200, "README.md is the landing page: keep it short, put details in docs/"


# ----------------------------------------------------------------------------- generated references


def test_generated_references_are_current():
    """docs/config.md, docs/cli.md and docs/tables.md are generated from the code; a change to a config key, an
    argument or a column must be followed by regenerating them."""
    from bloodray.cli import build_parser
    from bloodray.reference import REGENERATE, stale_files

    stale = stale_files(ROOT, build_parser())
    assert not stale, (f"stale generated docs: {', '.join(stale)}; regenerate them from the repository root with "
                       f"`{REGENERATE}` and commit the result")


def test_every_config_key_has_a_meaning():
    from bloodray.reference import JOBS, job_keys

    missing = [f"{job}: {k.key}" for job in JOBS for k in job_keys(job) if not k.meaning]
    assert not missing, ("config keys without a `#:` comment above their field (their meaning in docs/config.md "
                         "and `bloodray config --reference`):\n  " + "\n  ".join(missing))


def test_every_output_column_is_in_the_data_dictionary():
    from bloodray.nightly.dictionary import undocumented

    missing = undocumented()
    assert not missing, ("columns of bloodray/nightly/contract.py without a unit and meaning in "
                         "bloodray/nightly/dictionary.py (COLUMNS or PATTERNS):\n  " + "\n  ".join(missing))


def test_config_reference_command_prints_every_key(capsys):
    from bloodray.cli import run

    assert run(["config", "--reference", "classify"]) == 0
    out = capsys.readouterr().out
    assert "| `limits.max_pixels` | int | 25,000,000 |" in out and "`shift.on_alarm`" in out


def test_docs_check_names_the_regenerate_command(tmp_path, capsys):
    from bloodray.cli import run

    (tmp_path / "docs").mkdir()
    assert run(["docs", "--check", "--root", str(tmp_path)]) == 1
    assert "docs/config.md: stale; regenerate with `PYTHONPATH=. python -m bloodray docs`" in capsys.readouterr().err
