"""The README's quick start and CI must not drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands(page: Path = ROOT / "README.md") -> list[str]:
    text = page.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, flags=re.S)]


def test_quick_start_is_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "rescli finetune sample_data" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert quick_start_commands()[1] in ci.splitlines()


def test_docs_home_page_shows_the_same_quick_start():
    assert quick_start_commands(ROOT / "docs" / "index.md") == quick_start_commands()


def test_sample_data_is_bundled_and_small():
    files = [p for p in (ROOT / "sample_data").rglob("*") if p.is_file()]
    assert len({p.parent.name for p in files}) == 10 and 300 <= len(files) <= 1000
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
