"""The documentation stays true to the code: generated reference pages match, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from volttl.reference_pages import PAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_generated_reference_pages_match_the_code(page):
    from volttl.outputs.folders import ReferenceDir

    path = getattr(ReferenceDir(ROOT / "docs" / "reference"), page)
    assert path.read_text(encoding="utf-8") == PAGES[page](), (
        f"{path} differs from the code: run `python -m volttl.reference_pages docs/reference`")


def test_every_config_key_is_on_the_config_page():
    import dataclasses

    from volttl.config import Config

    text = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.type if isinstance(section.type, type)
                                      else type(getattr(Config(), section.name))):
            assert f"| `{key.name}` |" in text, f"{section.name}.{key.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_and_users_see_only_their_own_files(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
    for private in ("../shared", "DESIGN.md", "FACTS.md"):
        assert private not in text, f"{doc.name} points at {private}"


def test_every_test_the_docs_name_exists():
    """The reliability catalogue names the test behind each case: none may be missing."""
    source = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    name = r"`(test_[a-z0-9]+_[a-z0-9]+_[a-z0-9_]+)`"  # three words at least: not the key test_split
    named = {n for doc in DOCS for n in re.findall(name, doc.read_text(encoding="utf-8"))}
    assert named and not [n for n in sorted(named) if f"def {n}(" not in source]


def test_every_source_path_and_module_the_docs_name_exists():
    """Modules move (the second renovation moved a dozen): a page that names
    ``volttl/x.py`` or ``volttl.x.y`` must name something that is there. The changelog keeps
    history and may name what is gone."""
    import importlib

    def exists(dotted: str) -> bool:
        parts = dotted.split(".")
        for k in range(len(parts), 1, -1):
            try:
                obj = importlib.import_module(".".join(parts[:k]))
                for name in parts[k:]:
                    obj = getattr(obj, name)
                return True
            except (ImportError, AttributeError):
                continue
        return False

    gone = []
    for page in (p for p in DOCS if p.name != "CHANGELOG.md"):
        text = page.read_text(encoding="utf-8")
        gone += [f"{page.relative_to(ROOT)}: {m}" for m in re.findall(r"volttl/[\w/]+\.(?:py|yaml)", text)
                 if not (ROOT / m).exists()]
        gone += [f"{page.relative_to(ROOT)}: {m}" for m in re.findall(r"volttl(?:\.[a-z_]+)+", text)
                 if not exists(m)]
    assert not gone, gone
