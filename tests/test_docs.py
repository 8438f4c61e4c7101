"""The documentation: the MkDocs site builds with --strict, README.md stays short and its links resolve, and the
test command README gives is the one CI runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 160  # "at most about 150": the front page, with its generated results block
# Internal references that do not belong in the repository's files; built from parts so that this file passes too.
FORBIDDEN = re.compile("SP" + "EC|iss" + r"ue [0-9]")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def build_site(site: Path, config: Path = REPO / "mkdocs.yml") -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `config` into `site`: any warning (a broken link or anchor, a page left out of the
    nav, a missing image) fails it."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("MkDocs is not installed: pip install -r requirements-docs.txt")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its successor
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    built = build_site(folder)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return folder


def test_the_site_builds_with_strict_and_has_every_page(site):
    pages = sorted(path.stem for path in (REPO / "docs").glob("*.md"))
    assert {"index", "crossq", "crossq_td3", "sac", "paper", "results", "performance", "contributing"} <= set(pages)
    for page in pages:
        html = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), f"docs/{page}.md was not rendered"
    assert (site / "figures" / "mujoco_cpu_steps.png").is_file()


def test_each_script_page_has_the_skeleton_and_numbered_implementation_details():
    for page in ("crossq.md", "crossq_td3.md", "sac.md"):
        text = (REPO / "docs" / page).read_text()
        headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
        assert headings == ["Overview", "Usage", "Logged metrics", "Implementation details", "Results"], page
        details = text.split("## Implementation details")[1].split("## Results")[0]
        assert re.search(r"^1\. \*\*", details, re.MULTILINE) and re.search(r"^5\. \*\*", details, re.MULTILINE), page


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The check above can fail: a page that links to a page that is not there does not build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nnav:\n  - Home: index.md\n")
    built = build_site(tmp_path / "site", tmp_path / "mkdocs.yml")
    assert built.returncode != 0 and "missing.md" in built.stderr + built.stdout


def test_readme_is_short_and_its_links_resolve(site):
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, f"README.md has {len(readme.splitlines())} lines"
    for target in MARKDOWN_LINK.findall(readme):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), f"README.md links to {path}, which is not there"
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            page = Path(path).relative_to("docs").with_suffix("")
            html = (site / ("" if page.name == "index" else page) / "index.html").read_text()
            assert f'id="{anchor}"' in html, f"README.md links to {target}, whose anchor is not on the page"


def test_readme_test_command_is_what_ci_runs():
    """README's test block installs what .ci/run installs and ends with the command .ci/run ends with."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Test\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    requirements = lambda line: set(re.findall(r"-r (\S+)", line))
    ci_install = next(line for line in ci if line.startswith("pip install") and "-r " in line)
    readme_install = next(line for line in block if line.startswith("pip install"))
    assert requirements(readme_install) == requirements(ci_install)
    assert "requirements-docs.txt" in requirements(readme_install)
    assert block[-1] == ci[-1] == "python -m pytest -n 2"


def test_no_file_cites_internal_specs_or_issue_numbers():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    files = listed.stdout.splitlines() if listed.returncode == 0 else ["README.md", "mkdocs.yml"]
    files += [] if listed.returncode == 0 else [str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md")]
    for name in files:
        path = REPO / name
        if not path.is_file() or path.suffix in {".png", ".npz", ".mp4", ".whl"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            assert not FORBIDDEN.search(line), f"{name}:{number}: {line.strip()}"
