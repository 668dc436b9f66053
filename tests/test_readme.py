"""The README stays a guide: the two commands at its top, about 150-200 lines, no line over 120 characters, and
every link to docs/ or a file of the repository resolves."""

import re

from conftest import REPO


def test_readme_is_a_short_guide_that_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 210, len(lines)
    assert [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    top = "\n".join(lines[:8])
    assert "make demo" in top and "make test" in top


def test_every_relative_link_in_the_readme_and_docs_resolves():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_every_vae_subcommand_appears_in_the_readme():
    """Each command the parser offers (`vae data shard`, `vae registry rollback`, ...) is named in the README."""
    import argparse

    from vae.cli import build_parser

    def commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    below = commands(sub, f"{prefix} {name}")
                    found += below or [f"{prefix} {name}"]
        return found

    offered = commands(build_parser(), "vae")
    text = (REPO / "README.md").read_text()
    assert len(offered) >= 10 and [c for c in offered if f"`{c}" not in text] == [], offered
