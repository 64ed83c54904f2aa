"""The docs: the generated CLI reference matches the commands, the site's nav matches docs/, the README stays short."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command_info(name: str):
    """The Typer app's record of one command (only rescli.cli.app is relied on, not the module's functions)."""
    from rescli.cli.app import app

    for info in app.registered_commands:
        if (info.name or info.callback.__name__.replace("_", "-")) == name:
            return info
    raise AssertionError(f"no command {name} in rescli.cli.app")


def test_cli_reference_page_is_current(cli_reference, monkeypatch, capsys):
    # A narrow, colour-forcing terminal must not matter: the page is built from the click objects, not from --help.
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.setenv("FORCE_COLOR", "1")
    problem = cli_reference.check()
    assert problem is None, problem
    assert cli_reference.main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_reference_lists_every_command_option_and_default(cli_reference):
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name in ("finetune", "lr-find", "dataset", "evaluate", "report", "predict", "degradation", "export", "info"):
        assert f"\n## rescli {name}\n" in page
    assert "| `--batch-size`, `-b` | INTEGER | `64` | Images per step. |" in page  # degradation's, with its default
    assert "| `--format`, `-f` | table\\|jsonl\\|json\\|csv\\|tsv | `table` |" in page  # choices, escaped for the table
    assert "| `--cache-images` / `--no-cache-images` | flag | `--cache-images` |" in page
    assert "rescli predict [OPTIONS] INPUTS...\n" in page and "rescli finetune [OPTIONS] [DATA_DIR]\n" in page


def test_check_fails_when_a_command_help_changes_and_the_page_was_not_regenerated(
    cli_reference, monkeypatch, tmp_path, capsys
):
    page = tmp_path / "cli.md"
    page.write_text(cli_reference.render(), encoding="utf-8")
    assert cli_reference.main(["--check", "--page", str(page)]) == 0

    monkeypatch.setattr(_command_info("evaluate"), "help", "Score MODEL on labelled images, differently.")
    assert cli_reference.main(["--check", "--page", str(page)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is stale" in err and "python scripts/cli_reference.py" in err

    assert cli_reference.main(["--page", str(page)]) == 0  # regenerating fixes it
    assert "differently." in page.read_text(encoding="utf-8")
    assert cli_reference.main(["--check", "--page", str(page)]) == 0


def test_check_names_a_missing_page(cli_reference, tmp_path, capsys):
    assert cli_reference.main(["--check", "--page", str(tmp_path / "cli.md")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cli.md is missing" in err and "python scripts/cli_reference.py" in err


def nav_pages() -> list[str]:
    """The .md files named under `nav:` in mkdocs.yml (one `- Title: page.md` per line; no YAML library needed)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:\n", 1)[1]
    pages = []
    for line in nav.splitlines():
        if line and not line.startswith((" ", "-")):
            break  # the next top-level key
        match = re.fullmatch(r"\s*-\s*(?:[^:]+:\s*)?(\S+\.md)\s*", line)
        if match:
            pages.append(match.group(1))
    return pages


def test_every_nav_page_exists_and_every_docs_page_is_in_the_nav():
    pages = nav_pages()
    assert len(pages) == len(set(pages)), pages
    assert [p for p in pages if not (DOCS / p).is_file()] == []
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(pages)
    assert pages[0] == "index.md" and "cli.md" in pages


def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve_on_github():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"README links to {link}: no such heading"
