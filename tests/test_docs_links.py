"""The README and every page under docs/: each relative link resolves to a file or folder of the repository, and the
README stays a front page (at most 250 lines).

Checked: Markdown links and images, ``[x](path)`` and ``![x](path)``, outside code blocks and code spans, and HTML
``href=`` / ``src=`` attributes (in .md and .html files).  Skipped: http(s):, mailto:, data: and #anchor links.  A
link's ``#anchor`` and ``?query`` are stripped; a path starting with ``/`` is read from the repository root.  A link
to a git-ignored path counts as broken even where the file exists locally: a fresh clone (CI) lacks it."""
import os
import re
import subprocess
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250

MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:https?:|mailto:|data:|#)", re.IGNORECASE)
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def doc_files(root: str = ROOT) -> list[str]:
    """README.md and every .md / .html file under docs/, recursively."""
    files = [os.path.join(root, "README.md")]
    for folder, dirs, names in os.walk(os.path.join(root, "docs")):
        dirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith((".md", ".html"))]
    return files


def _links(text: str, markdown: bool) -> list[tuple[int, str]]:
    """(line number, link target) of every link in ``text``."""
    out = []
    in_fence = None
    for number, line in enumerate(text.split("\n"), 1):
        if markdown:
            fence = FENCE.match(line)
            if fence:
                in_fence = None if in_fence == fence.group(1) else (in_fence or fence.group(1))
                continue
            if in_fence:
                continue
            line = CODE_SPAN.sub("", line)
            out += [(number, m.group(1)) for m in MD_LINK.finditer(line)]
        out += [(number, m.group(1) if m.group(1) is not None else m.group(2)) for m in HTML_LINK.finditer(line)]
    return out


def _git_ignored(paths: list[str], root: str) -> set[str]:
    """The ``paths`` git ignores in the work tree at ``root`` (none where ``root`` is not one, or git is missing)."""
    if not paths:
        return set()
    try:
        done = subprocess.run(["git", "-C", root, "check-ignore", "--stdin", "-z"], input="\0".join(paths) + "\0",
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if done.returncode not in (0, 1):  # 128: not a git work tree
        return set()
    return {os.path.normpath(os.path.join(root, p)) for p in done.stdout.split("\0") if p}


def broken_links(files: list[str], root: str = ROOT) -> list[str]:
    """One line ``FILE:LINE: broken link 'TARGET'`` per relative link in ``files`` that resolves to nothing (or to a
    git-ignored path: ``... (git-ignored)``)."""
    problems, found = [], []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for number, target in _links(text, markdown=path.endswith(".md")):
            target = target.strip()
            if not target or EXTERNAL.match(target):
                continue
            local = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not local:
                continue
            base = root if local.startswith("/") else os.path.dirname(path)
            resolved = os.path.normpath(os.path.join(base, local.lstrip("/")))
            where = f"{os.path.relpath(path, root)}:{number}: broken link {target!r}"
            if os.path.exists(resolved):
                found.append((resolved, where))
            else:
                problems.append(where)
    ignored = _git_ignored(sorted({os.path.relpath(r, root) for r, _ in found}), root)
    problems += [f"{where} (git-ignored)" for resolved, where in found if resolved in ignored]
    return problems


def test_every_relative_link_resolves():
    problems = broken_links(doc_files())
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_the_checker_reports_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# page\n")
    (tmp_path / "fig.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# tiny\n"
        "[ok](docs/page.md#top) ![ok](fig.png) [web](https://example.org/x) [anchor](#tiny)\n"
        "`[in a code span](nowhere.md)`\n"
        "```\n[in a code block](nowhere.md)\n```\n"
        "see [the missing page](docs/missing.md#part) and <img src=\"gone.png\">\n"
    )
    (tmp_path / "docs" / "report.html").write_text('<a href="../docs/page.md">ok</a>\n<img src="none.png">\n')
    problems = broken_links(doc_files(str(tmp_path)), root=str(tmp_path))
    assert problems == [
        "README.md:7: broken link 'docs/missing.md#part'",
        "README.md:7: broken link 'gone.png'",
        "docs/report.html:2: broken link 'none.png'",
    ]


def test_a_link_to_a_git_ignored_file_is_broken(tmp_path):
    if subprocess.run(["git", "init", "-q", str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("git is not available")
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "grid.png").write_bytes(b"")
    (tmp_path / "kept.png").write_bytes(b"")
    (tmp_path / "README.md").write_text("![kept](kept.png)\n![local only](runs/grid.png)\n")
    problems = broken_links(doc_files(str(tmp_path)), root=str(tmp_path))
    assert problems == ["README.md:2: broken link 'runs/grid.png' (git-ignored)"]
