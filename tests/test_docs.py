"""The documentation stands alone and keeps up with the code: docs/api.md names every route the app
serves, every relative link in the Markdown files leads to a file of the repository, and nothing
refers to documents that live outside it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tracker.app import create_app
from tracker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\.\./shared|\bshared/(CONTRACT|DOMAIN)|\bCONTRACT\.md|\bDOMAIN\.md")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_the_api_reference_names_every_route(tmp_path):
    app = create_app(Settings(secret="s" * 32, admin_key="a" * 32, data_dir=tmp_path))
    api = (ROOT / "docs" / "api.md").read_text()
    paths = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path and not path.startswith("/support"):  # the console's pages: one section for all
            paths.add(path)
    assert "/support/" in api
    assert sorted(p for p in paths if f"{p}`" not in api) == []


def test_relative_links_in_the_markdown_lead_to_files_of_the_repository():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "SECURITY.md", ROOT / "CHANGELOG.md"]:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (doc.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_setting_the_documentation_names_exists():
    """A `TRACKER_*` name in the prose is one docs/configuration.md documents (or the tests' own)."""
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(TRACKER_[A-Z0-9_]+)`", configuration, re.M)) | {"TRACKER_FUZZ_EXAMPLES"}
    named = {f"{path.relative_to(ROOT)}: {name}"
             for path in [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md")),
                          *sorted((ROOT / "deploy").rglob("*.yaml"))]
             for name in re.findall(r"\bTRACKER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()) if name not in documented}
    assert sorted(named) == []


def test_nothing_refers_to_documents_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{n}" for path in tracked("*.md", "*.py", "*.yaml", "*.sql", "*.toml", "Makefile")
             if path.name != "test_docs.py"
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert found == []
