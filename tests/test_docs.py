"""The documentation stays a guide: a short README, links that resolve, a CLI table that matches the
parser, and no issue numbers in the product (code, SQL, docs, benchmarks, build files)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024

#: "issue 7", "Issue #12", "issue-7", "issue7"
ISSUE_NUMBER = re.compile(r"issue[ -]?#?\d+", re.IGNORECASE)
PRODUCT = [
    "README.md",
    "docs",
    "benchmarks",
    "billing_dags",
    "sql_models",
    "seeds",
    "grafana",
    "prometheus",
    "Makefile",
    "pyproject.toml",
    "dagster.yaml",
    "workspace.yaml",
]
TEXT_SUFFIXES = {".py", ".md", ".sql", ".toml", ".yaml", ".yml", ".txt", ".csv", ".json", ".cfg", ".ini", ""}
SKIP_DIRS = {"__pycache__", "out", ".pytest_cache"}

#: [text](target) — targets without a scheme are files relative to the markdown file
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _product_files() -> list[Path]:
    files = []
    for name in PRODUCT:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(files)


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


def test_readme_is_a_short_guide():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, (
        f"README.md is {size:,} bytes (limit {README_MAX_BYTES:,}): move operations detail into docs/ and performance figures into benchmarks/README.md"
    )


def test_no_issue_numbers_in_the_product():
    hits = []
    for path in _product_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if m := ISSUE_NUMBER.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {m.group(0)!r} in {line.strip()[:100]}")
    assert not hits, "say what the thing does or measures, not which issue asked for it:\n" + "\n".join(hits)


def test_the_issue_pattern_can_match():
    assert ISSUE_NUMBER.search("every figure of Issue 7") and ISSUE_NUMBER.search("see issue #12")
    assert not ISSUE_NUMBER.search("a known issue with 7 days")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(md):
    broken = []
    for target in LINK.findall(md.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        file = md.parent / path if path else md
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{md.relative_to(ROOT)} links to what does not exist: {broken}"


# ----------------------------------------------------------------------------- the CLI table


def _build_parser() -> argparse.ArgumentParser:
    from billing_dags.cli.main import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _cli_table_rows() -> list[str]:
    """The first cell of each row of the table under the README's command-line heading."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## [^\n]*command[- ]line[^\n]*\n(.*?)(?=^## |\Z)", text, re.IGNORECASE | re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## ... command line' section"
    cells = [line.split("|")[1].strip() for line in m.group(1).splitlines() if line.startswith("|")]
    rows = [c.strip("`") for c in cells if c.strip("`").startswith("billing ")]
    assert rows, "the command-line section has no table of `billing ...` rows"
    return rows


def test_readme_cli_table_names_real_subcommands_and_flags():
    top = _build_parser()
    problems = []
    for row in _cli_table_rows():
        # `billing stripe send (--day D | --month M)`: the words before the first option or placeholder
        words = re.findall(r"[a-z][a-z0-9-]*|--?[a-zA-Z][\w-]*|\S", row.split(" ", 1)[1])
        parser, path = top, ["billing"]
        for word in words:
            subs = _subcommands(parser)
            if not subs or not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            if word not in subs:
                problems.append(f"{row!r}: {' '.join(path)} has no subcommand {word!r} (it has {sorted(subs)})")
                parser = None
                break
            parser, path = subs[word], [*path, word]
        if parser is None:
            continue
        if len(path) == 1:
            problems.append(f"{row!r}: names no subcommand")
            continue
        if _subcommands(parser):
            problems.append(f"{row!r}: `{' '.join(path)}` is a group: name one of {sorted(_subcommands(parser))} per row")
            continue
        for flag in re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", row):
            if flag not in _options(parser):
                problems.append(f"{row!r}: `{' '.join(path)}` has no option {flag}")
    assert not problems, "\n".join(problems)


def test_readme_configuration_names_every_environment_variable_the_code_reads():
    code = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "billing_dags").rglob("*.py"))
    read = set(re.findall(r"\b(?:BILLING|PROMETHEUS|STRIPE)_[A-Z][A-Z_]*[A-Z]\b", code))
    assert read, "no BILLING_/PROMETHEUS_/STRIPE_ variable found in billing_dags: is the pattern still right?"
    missing = sorted(read - set(re.findall(r"\b(?:BILLING|PROMETHEUS|STRIPE)_[A-Z_]+", README.read_text(encoding="utf-8"))))
    assert not missing, f"README.md's configuration does not name {missing}"


def test_readme_cli_table_lists_every_subcommand():
    def leaves(parser: argparse.ArgumentParser, path: str) -> list[str]:
        subs = _subcommands(parser)
        return [leaf for name, sub in subs.items() for leaf in leaves(sub, f"{path} {name}")] if subs else [path]

    rows = _cli_table_rows()
    missing = [cmd for cmd in leaves(_build_parser(), "billing") if not any(re.match(re.escape(cmd) + r"( |$)", row) for row in rows)]
    assert not missing, f"README.md's command-line table has no row for {missing}"
