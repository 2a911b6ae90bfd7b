"""The documentation: the recipe reference is the schema's, and the MkDocs site builds with every link checked.

Neither test trains anything: seconds. Without mkdocs the build test skips, except under CI=true, where a
missing mkdocs is a failure (the `test` extra installs it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipes", ROOT / "docs" / "gen_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_is_generated_from_the_schema():
    expected = _generator().render()
    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert committed == expected, (
        "docs/recipes.md differs from what swap_accel/recipe.py generates; run "
        "`.venv/bin/python docs/gen_recipes.py` and commit the result")


def _mkdocs_available() -> bool:
    if importlib.util.find_spec("mkdocs") is not None:
        return True
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("mkdocs is not installed but CI=true: install the test extra (pip install -e '.[test]')")
    pytest.skip("mkdocs is not installed (pip install -e '.[test]')")


def test_docs_build_strict_with_links_checked(tmp_path):
    _mkdocs_available()
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    # The README is outside the site: check its links into docs/ (pages and anchors) against the built pages.
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert links, "the README links to no docs page"
    for page, anchor in links:
        assert (ROOT / page).is_file(), f"README links to {page}, which does not exist"
        if page.endswith(".md") and anchor:
            name = Path(page).stem
            html = site / ("index.html" if name == "index" else f"{name}/index.html")
            assert f'id="{anchor}"' in html.read_text(), f"README links to {page}#{anchor}: no such anchor"
