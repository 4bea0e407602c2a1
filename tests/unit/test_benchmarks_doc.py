"""BENCHMARKS.md has no figure without a stored results file behind it: its tables are generated from the results
files in the repo (`benchmarks/report.py`), and its prose quotes only figures those tables hold. The README's
measured table (the walkthrough's run times) is generated the same way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_md_is_generated_from_the_stored_results():
    module = report()
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert module.render(text) == text, "BENCHMARKS.md differs from its results: run python benchmarks/report.py"
    assert module.figures_without_a_source(text) == []
    assert len(module.BLOCK.findall(text)) >= 6  # every section's table comes from a file


def test_the_readme_walkthrough_table_is_generated_from_its_results():
    module = report()
    text = (ROOT / "README.md").read_text()
    assert "<!-- generated: walkthrough benchmarks/results/walkthrough/results.json -->" in text
    assert module.render(text) == text, "README.md differs from its results: run python benchmarks/report.py"


def test_the_checks_catch_an_edited_table_and_an_unsourced_figure():
    module = report()
    text = (ROOT / "BENCHMARKS.md").read_text()
    edited = text.replace("| verifier alone |  |  | 1.00 |", "| verifier alone |  |  | 1.01 |", 1)
    assert edited != text and module.render(edited) != edited
    assert module.figures_without_a_source(text + "\nEAGLE-3 reaches 9.87x here.\n") == ["9.87x"]
    assert module.figures_without_a_source(text + "\nand 97% of the ideal.\n") == ["97%"]
