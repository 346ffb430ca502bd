"""The docs stand on their own: code and docs cite only what is in the repository, every relative
link of docs/*.md and README.md resolves (file and heading), and every repository path the docs
name exists."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
SOURCE_DIRS = ("vidartrain", "data_tools", "launch", "configs", "ds_configs", "benchmarks", "tests", "docs", ".ci")
SOURCE_SUFFIXES = {".py", ".sh", ".sbatch", ".yaml", ".yml", ".json", ".md", ".toml", ".txt", ".example"}
# Documents that are not in the repository (this file names them, so it is not scanned).
OUTSIDE_REFERENCE = re.compile(r"design[\s_-]*note|DESIGN\.md|shared/+seed|pipeline_note", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
TOP_LEVEL = ("vidartrain/", "data_tools/", "launch/", "configs/", "ds_configs/", "tests/", "benchmarks/", "docs/")


def source_files() -> list[Path]:
    files = [REPO / name for name in ("README.md", "pyproject.toml", "requirements.txt")]
    for folder in SOURCE_DIRS:
        files += [path for path in (REPO / folder).rglob("*")
                  if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts]
    return [path for path in files if path != Path(__file__).resolve()]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {github_anchor(match) for match in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_docs_pages_exist():
    names = {page.name for page in DOCS}
    assert {"README.md", "data.md", "models.md", "conventions.md", "training.md", "code-map.md"} <= names
    assert "docs/README.md" in (REPO / "README.md").read_text(encoding="utf-8")


def test_code_and_docs_cite_nothing_outside_the_repository():
    offending = []
    for path in source_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offending, "references to documents outside the repository (cite docs/ instead):\n" + \
        "\n".join(offending)


def test_the_outside_reference_pattern_catches_what_it_should():
    for text in ("see the design note", "the Design-Note's table", "DESIGN.md", "../shared/seed/x.md"):
        assert OUTSIDE_REFERENCE.search(text), text
    assert not OUTSIDE_REFERENCE.search("docs/conventions.md: the flow matching convention")


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """Relative links of a markdown page whose file (inside `root`) or heading does not exist."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or root not in (linked, *linked.parents):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(root)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_link_check_finds_missing_files_and_headings(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "other.md").write_text("# Other page\n\n## The KV cache (`models/wan/kv_cache.py`)\n")
    (tmp_path / "x.md").write_text("outside the root")
    page = root / "page.md"
    page.write_text("[ok](other.md#the-kv-cache-modelswankv_cachepy) [web](https://example.org) [top](#title)\n"
                    "# Title\n[gone](missing.md) [no heading](other.md#nowhere) [outside](../x.md)\n")
    assert broken_links(page, root=root) == [
        "missing.md: no such file in the repository", "other.md#nowhere: no heading #nowhere in other.md",
        "../x.md: no such file in the repository"]


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_repository_paths_named_in_the_docs_exist(page):
    missing = []
    for span in CODE_SPAN.findall(page.read_text(encoding="utf-8")):
        for word in span.split():
            word = word.strip(",;:()")
            if word.startswith(TOP_LEVEL) and "*" not in word and not (REPO / word).exists():
                missing.append(word)
    assert not missing, f"docs/{page.name} names paths that do not exist: {missing}"


def test_the_code_map_names_every_module():
    """docs/code-map.md says where each idea lives: a module it does not name is one nobody can find there."""
    code_map = (REPO / "docs" / "code-map.md").read_text(encoding="utf-8")
    named = {word.strip(",;:()") for span in CODE_SPAN.findall(code_map) for word in span.split()}
    modules = [path.relative_to(REPO).as_posix() for folder in ("vidartrain", "data_tools", "launch", "benchmarks")
               for path in sorted((REPO / folder).rglob("*"))
               if path.suffix in {".py", ".sh", ".sbatch"} and path.name != "__init__.py"
               and "__pycache__" not in path.parts]
    unnamed = [module for module in modules if module not in named]
    assert not unnamed, f"docs/code-map.md names no row for: {unnamed}"
