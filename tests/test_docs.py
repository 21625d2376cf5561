"""The repository's own references resolve: paths it names exist, `docs/X.md §N.M` points at a real heading, and the
docs describe the product rather than how it was developed.

Scanned: the text files under mimoflash/, tests/, scripts/, benchmarks/, docs/, .ci/, plus README.md and
pyproject.toml. Each test collects every problem before failing, so one run lists them all.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ["mimoflash", "tests", "scripts", "benchmarks", "docs", ".ci"]
TOP_FILES = ["README.md", "pyproject.toml"]
# Prose and code; not data files (a tokenizer's vocabulary can hold any string).
TEXT_SUFFIXES = {".py", ".md", ".sh", ".c", ".h", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".html", ".js",
                 ".css", ""}
SKIP_DIRS = {"__pycache__", ".pytest_cache", "node_modules"}
THIS = Path(__file__).resolve()

# A path into the repository: starts at a top-level folder, not preceded by another path component (so
# `~/.cache/mimoflash/kernels/` is not taken for `mimoflash/kernels/`).
PATH_RE = re.compile(r"(?<![\w./~$-])((?:mimoflash|tests|scripts|benchmarks|docs)/[\w./-]*)")
DOC_RE = re.compile(r"(?<![\w./~$-])docs/([\w-]+\.md)")
SECTION = r"§\s?\d+(?:\.\d+)*(?:\s?[-–]\s?\d+(?:\.\d+)*)?"
# `docs/X.md §1.1-1.2, §3 and §8`: a document followed by a list of sections.
# The `docs/` prefix may be left out (`MODEL.md §6`); the name must then still be a file in docs/.
DOC_SECTIONS_RE = re.compile(rf"(?<![\w./~$-])(?:docs/)?([\w-]+\.md)((?:\s*(?:,|and|or)?\s*{SECTION})+)")
SECTION_RE = re.compile(SECTION)
HEADING_RE = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)

FORBIDDEN_CITATIONS = [
    (re.compile(r"\.\./shared|/work/shared"), "a path outside the repository"),
    (re.compile(r"\bSPEC\s*§|\bSPEC\.md\b"), "a design document users do not have"),
    (re.compile(r"\bARCHITECTURE\s+rules?\b"), "a design document users do not have"),
    (re.compile(r"\bPEERS(?:\.md)?\b"), "a design document users do not have"),
    (re.compile(r"\bdesign brief\b", re.I), "a design document users do not have"),
]
ORDINALS = "this|previous|earlier|last|next|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth"
DEVELOPMENT_LOG = [
    (re.compile(rf"\b(?:{ORDINALS})\s+sessions?\b", re.I), "talks about work sessions"),
    (re.compile(r"\bissues?\s*#?\d+", re.I), "cites an issue number"),
    (re.compile(r"\bthe engine issue\b", re.I), "cites an issue"),
    (re.compile(r"(?<![\w.~-])/(?:root|work|tmp|home/[\w.-]+|Users/[\w.-]+)/"), "an absolute path of one machine"),
]
COMMIT_RE = re.compile(r"\bcommits?\s+[0-9a-f]{7,40}\b")


def scanned_files() -> list[Path]:
    files = [REPO / name for name in TOP_FILES if (REPO / name).is_file()]
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*")):
            if not path.is_file() or SKIP_DIRS & set(path.relative_to(REPO).parts):
                continue
            if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 1_000_000 or path.resolve() == THIS:
                continue
            files.append(path)
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def headings(doc: Path) -> set[str]:
    """Section numbers of a markdown file's numbered headings: `## 2. Forward pass` -> "2", `### 2.3 ...` -> "2.3"."""
    return set(HEADING_RE.findall(read(doc)))


def section_numbers(text: str) -> list[str]:
    """`§1.1-1.2, §3` -> ["1.1", "1.2", "3"]: both ends of a range must exist."""
    out = []
    for ref in SECTION_RE.findall(text):
        out.extend(p.strip() for p in re.split(r"[-–]", ref.replace("§", "")))
    return out


def test_scanner_sees_the_repository():
    names = {rel(p) for p in scanned_files()}
    assert {"README.md", "docs/MODEL.md", "mimoflash/config.py", "mimoflash/kernels/ops.c"} <= names
    assert rel(THIS) not in names


def test_scanner_patterns_on_examples():
    """The patterns themselves: what counts as a path, a section list, a heading (examples, not the repository)."""
    text = "see docs/MODEL.md §1.1-1.2, §3 and §8; cached in ~/.cache/mimoflash/kernels/ and mimoflash/kernels/ops.c."
    assert [m.group(1) for m in PATH_RE.finditer(text)] == ["docs/MODEL.md", "mimoflash/kernels/ops.c."]
    ((doc, secs),) = DOC_SECTIONS_RE.findall(text)
    assert doc == "MODEL.md" and section_numbers(secs) == ["1.1", "1.2", "3", "8"]
    assert DOC_SECTIONS_RE.findall("(price: MODEL.md §6)") == [("MODEL.md", " §6")]
    assert HEADING_RE.findall("## 2. Forward pass\n### 2.3 Attention\n## Sources\n") == ["2", "2.3"]
    assert DEVELOPMENT_LOG[0][0].search("as the previous session measured")
    assert not DEVELOPMENT_LOG[0][0].search("chat ends the session")
    machine_path = DEVELOPMENT_LOG[-1][0]
    assert machine_path.search("files under /root/.pyenv/versions/3.11.7/lib") and machine_path.search("(/home/ann/x)")
    assert not machine_path.search("POST /v1/chat/completions, ~/.cache/mimoflash/ or runs/tmp/x")


def test_every_repository_path_mentioned_exists():
    missing = []
    for path in scanned_files():
        text = read(path)
        for m in PATH_RE.finditer(text):
            target = m.group(1).rstrip(".")
            if not (REPO / target).exists():
                missing.append(f"{rel(path)}:{line_of(text, m.start())}: {target}")
    assert not missing, "paths that do not exist in the repository:\n" + "\n".join(sorted(set(missing)))


def test_every_docs_section_reference_resolves():
    """`docs/X.md §N.M` names a numbered heading of X.md. A bare `§N.M` inside a docs/X.md with numbered headings means
    X.md itself; a bare one anywhere else means the document named last before it in the same file (and there must
    be one)."""
    problems = []
    for path in scanned_files():
        text = read(path)
        attached: set[int] = set()
        for m in DOC_SECTIONS_RE.finditer(text):
            doc = REPO / "docs" / m.group(1)
            attached.update(range(m.start(2), m.end(2)))
            if not doc.is_file():
                if not m.group(0).startswith("docs/"):  # a docs/X.md path is reported by the path test
                    problems.append(f"{rel(path)}:{line_of(text, m.start())}: docs/{m.group(1)} does not exist")
                continue
            have = headings(doc)
            for number in section_numbers(m.group(2)):
                if number not in have:
                    problems.append(f"{rel(path)}:{line_of(text, m.start())}: docs/{m.group(1)} has no §{number}")
        own = path if rel(path).startswith("docs/") and path.suffix == ".md" and headings(path) else None
        for m in SECTION_RE.finditer(text):
            if m.start() in attached:
                continue
            if own is not None:
                doc = own
            else:
                before = list(DOC_RE.finditer(text, 0, m.start()))
                if not before:
                    problems.append(f"{rel(path)}:{line_of(text, m.start())}: {m.group(0)} names no document")
                    continue
                doc = REPO / "docs" / before[-1].group(1)
                if not doc.is_file():
                    continue
            have = headings(doc)
            for number in section_numbers(m.group(0)):
                if number not in have:
                    problems.append(f"{rel(path)}:{line_of(text, m.start())}: {rel(doc)} has no §{number}")
    assert not problems, "section references that do not resolve:\n" + "\n".join(problems)


def test_no_citation_of_documents_outside_the_repository():
    found = []
    for path in scanned_files():
        text = read(path)
        for pattern, why in FORBIDDEN_CITATIONS:
            for m in pattern.finditer(text):
                found.append(f"{rel(path)}:{line_of(text, m.start())}: {m.group(0)!r} ({why})")
    assert not found, "cite docs/MODEL.md or another file of the repository instead:\n" + "\n".join(found)


def _markdown_files() -> list[Path]:
    return [p for p in scanned_files() if p.suffix == ".md"]


@pytest.mark.parametrize("path", _markdown_files(), ids=rel)
def test_markdown_describes_the_product_not_its_development(path):
    """No work sessions, issue numbers or one machine's absolute paths in any .md; commit hashes only in benchmarks/RESULTS.md, the dated log of
    measurements, and in the README's benchmark table (which names the commit it measured)."""
    text = read(path)
    found = [f"line {line_of(text, m.start())}: {m.group(0)!r} ({why})"
             for pattern, why in DEVELOPMENT_LOG for m in pattern.finditer(text)]
    if rel(path) not in ("benchmarks/RESULTS.md", "README.md"):
        found += [f"line {line_of(text, m.start())}: {m.group(0)!r} (a commit hash: dated figures go in "
                  "benchmarks/RESULTS.md)" for m in COMMIT_RE.finditer(text)]
    assert not found, f"{rel(path)}:\n" + "\n".join(found)
