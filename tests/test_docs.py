"""The repository's documents hold together: the README stays a front page, every relative link in
the README and docs/ leads to a file (and heading) of the repository, and code comments cite
documents of the repository only, never design notes that live outside it.

Each failure names the file and line to fix."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
README_MAX_LINES = 150
CODE_DIRS = ("service", "worker", "bench", "tests", "migrations")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SECTION_SIGN = "\u00a7"
RFC_SECTION = re.compile(r"RFC\s*\d+\s*" + SECTION_SIGN)  # a section of a public standard, not of a design note
OUTSIDE_DOCS = re.compile(r"\bALGORITHMS\b|\bDESIGN\.md\b|\bCONVENTIONS\b")
DOC_PATH = re.compile(r"\bdocs/([\w.-]+\.md)(#[\w-]+)?")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_files() -> list[Path]:
    out = []
    for folder in CODE_DIRS:
        out += [p for p in sorted((ROOT / folder).rglob("*.py")) if p.resolve() != THIS]
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (letters, digits, '-', '_' and
    spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def check_target(source: Path, number: int, target: str, base: Path) -> str | None:
    """None if ``target`` (a path relative to ``base``, maybe with #anchor) exists; else the problem."""
    where = f"{rel(source)}:{number}"
    path_part, _, anchor = target.partition("#")
    dest = (base / path_part).resolve() if path_part else source.resolve()
    if ROOT not in dest.parents and dest != ROOT:
        return f"{where}: {target} points outside the repository"
    if not dest.exists():
        return f"{where}: {target} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{where}: {target}: {rel(dest)} has no heading with the anchor #{anchor}"
    return None


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the details to docs/")


def test_every_relative_link_in_the_documents_resolves():
    problems = []
    for md in markdown_files():
        for number, line in prose_lines(md):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, …
                    continue
                problem = check_target(md, number, target, md.parent)
                if problem:
                    problems.append(problem)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_no_code_comment_cites_a_design_note_outside_the_repository():
    problems = []
    for py in python_files():
        for number, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            if SECTION_SIGN in RFC_SECTION.sub("", line):
                problems.append(f"{rel(py)}:{number}: a {SECTION_SIGN} citation: {line.strip()}")
            elif OUTSIDE_DOCS.search(line):
                problems.append(f"{rel(py)}:{number}: names a document outside the repository: {line.strip()}")
    assert not problems, ("cite the docs/ page (and heading) that explains it instead:\n" + "\n".join(problems))


def test_every_docs_page_named_in_the_code_exists():
    problems = []
    for py in python_files():
        for number, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            for m in DOC_PATH.finditer(line):
                problem = check_target(py, number, f"{m.group(1)}{m.group(2) or ''}", ROOT / "docs")
                if problem:
                    problems.append(problem)
    assert not problems, "missing documents:\n" + "\n".join(problems)
