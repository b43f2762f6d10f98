"""README.md stays a short page for users whose results are generated from the benchmark records."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _table_module():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_block_is_what_the_records_give():
    assert _table_module().render(README) == README, "run: python benchmarks/readme_table.py"


def test_readme_starts_with_the_two_commands_and_stays_short():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]
    assert len(README.encode()) < 8192


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_product_docs_never_point_outside_the_repository():
    paths = [
        ROOT / "README.md",
        ROOT / "Makefile",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "benchmarks").rglob("README.md"),
    ]
    offenders = [str(p.relative_to(ROOT)) for p in paths if "../shared" in p.read_text()]
    assert not offenders


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target


def test_a_generated_block_replaces_only_what_lies_between_its_markers():
    import pytest

    from nugget2d.runtime.marked_block import replace_marked

    page = "intro\n<!-- a -->\nold\nrows\n<!-- /a -->\noutro\n"
    assert replace_marked(page, "<!-- a -->", "<!-- /a -->", "new\n") == "intro\n<!-- a -->\nnew\n<!-- /a -->\noutro\n"
    with pytest.raises(ValueError, match="lacks the markers"):
        replace_marked("<!-- /a --> <!-- a -->", "<!-- a -->", "<!-- /a -->", "x")
