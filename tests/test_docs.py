"""The documentation site builds with --strict (a broken link, a page missing from the nav or a marker the hook
does not know fails), and the pages generated from the code say what the code says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason="the docs extra (in dev) installs mkdocs")
pytest.importorskip("material", reason="the docs extra (in dev) installs mkdocs-material")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_site_builds_strict_with_every_page(site):
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages, "docs/ has no pages"
    for page in pages:
        assert page in nav, f"{page} is not in mkdocs.yml's nav"
        html = site / (page[:-3] + "/index.html" if page != "index.md" else "index.html")
        assert html.is_file(), html
        assert "<!-- stexport:" not in html.read_text()


def test_cli_reference_is_every_commands_help(site):
    from stexport.cli.app import app

    html = (site / "reference/cli/index.html").read_text()
    commands = [c.name for c in app.registered_commands]
    assert len(commands) >= 12
    for name in commands:
        assert f"stexport {name}" in html, name
    assert "--calib-clips" in html and "--decode-timeout" in html


def test_manifest_schema_and_moved_paths_come_from_the_code(site):
    from stexport._moved import MOVED
    from stexport.bundle.manifest import Manifest

    schema = (site / "reference/manifest/index.html").read_text()
    for record in Manifest.model_json_schema()["$defs"]:
        assert record in schema, record
    changelog = (site / "changelog/index.html").read_text()
    for old, new in MOVED.items():
        assert old in changelog and new in changelog, old


def test_readme_links_point_at_files():
    import re

    readme = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)#]+)[^)]*\)", readme) if not t.startswith("http")]
    assert len(links) >= 10
    for target in links:
        assert (ROOT / target).is_file(), target
