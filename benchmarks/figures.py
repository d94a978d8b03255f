"""One row of the benchmark table, and the table: figure, our value, the side-by-side reference,
the ratio, the target, and whether it holds.

Every benchmark module exposes ``figures(quick, out, console) -> list[Figure]`` for the items it
measures; ``python -m benchmarks`` runs them all and prints one table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from billing_dags.core.settings import PROJECT_ROOT

#: cached workloads and scratch space (gitignored); ``python -m benchmarks --out`` moves it
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out"


@dataclass(frozen=True)
class Figure:
    item: int  # the figure's number (as in benchmarks/README.md)
    figure: str  # what is measured, with the workload
    ours: str  # our value, formatted with its unit
    reference: str  # the side-by-side reference ("-" when the target has none)
    ratio: str  # ours / reference, or "-"
    target: str  # the target the figure is judged against
    met: bool | None  # None: reported, no threshold (or not measurable here)

    def to_json(self) -> dict:
        return asdict(self)


def verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "reported"}[met]


def table(figures: list[Figure], title: str):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for col in ("#", "figure", "ours", "reference (same run)", "ratio", "target", "holds"):
        t.add_column(col, justify="right" if col in ("#", "ratio") else "left", overflow="fold")
    for f in sorted(figures, key=lambda f: f.item):
        t.add_row(str(f.item), f.figure, f.ours, f.reference, f.ratio, f.target, verdict(f.met))
    return t


def markdown(figures: list[Figure]) -> str:
    """The same table as Markdown, for the README."""
    lines = ["| # | figure | ours | reference (same run) | ratio | target | holds |", "|---|---|---|---|---|---|---|"]
    for f in sorted(figures, key=lambda f: f.item):
        cells = [str(f.item), f.figure, f.ours, f.reference, f.ratio, f.target, verdict(f.met)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def scratch(out: Path, name: str) -> Path:
    """A folder under ``out`` for one benchmark's cache or scratch files."""
    d = Path(out) / name
    d.mkdir(parents=True, exist_ok=True)
    return d
