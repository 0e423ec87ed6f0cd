"""Build the bundled demo corpus from Python's HTML documentation (Debian `python3.11-doc`).

Re-run it with::

    apt-get install -y python3-doc          # installs /usr/share/doc/python3.11/html
    python tasks/demo/make_corpus.py        # writes tasks/demo/data/{train,validation}.jsonl.gz

What it does:

* parses every HTML page of the documentation with the standard library's `html.parser`,
  keeping only the main text (`<div role="main">`): paragraphs, list items, definition terms
  and bodies, headings, table cells. Code blocks (`<pre>`), scripts, the "¶" permalinks and the
  navigation are dropped; inline code (`<code>`) stays as running text, as it reads in prose;
* one document per page, long pages split into groups of whole paragraphs of at most
  `--max_doc_chars` characters (so that no single page dominates a shuffled stream);
* index/search pages are skipped (they are lists of names, not prose);
* the split is deterministic: a document goes to `validation` when the first byte of the
  SHA-256 of its `url` is below `256 * --validation_fraction`; everything else is `train`;
* every line of the output is a JSON object `{"text", "url", "title"}`; files are gzip'd with a
  fixed mtime so that re-running produces byte-identical output;
* the documentation's licence (PSF License Agreement, from `license.html`) is written to
  `tasks/demo/data/LICENSE.txt`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import io
import json
import os
import re
import sys

DEFAULT_HTML_ROOT = "/usr/share/doc/python3.11/html"
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# Pages that are lists of names or navigation, not prose.
SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents|download|index)\.html$")
SKIP_DIRS = ("_static", "_sources", "_images", "_downloads")

BLOCK_TAGS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th",
              "caption", "blockquote", "div", "section", "table", "ul", "ol", "dl", "tr"}
DROP_TAGS = {"pre", "script", "style", "button"}


class _MainTextParser(html.parser.HTMLParser):
    """Collect the paragraphs of a Sphinx page's main body as a list of strings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.title = ""
        self._main_depth = 0  # >0 while inside <div role="main">
        self._div_stack: list[bool] = []  # per open <div>: is it the main one?
        self._drop_depth = 0
        self._headerlink_depth = 0
        self._in_title = False
        self._buf: list[str] = []

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        self._buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "title":
            self._in_title = True
        if tag == "div":
            is_main = attr.get("role") == "main"
            self._div_stack.append(is_main)
            if is_main:
                self._main_depth += 1
        if not self._main_depth:
            return
        if tag in DROP_TAGS:
            self._drop_depth += 1
        elif tag == "a" and "headerlink" in (attr.get("class") or ""):
            self._headerlink_depth += 1
        elif tag in BLOCK_TAGS or tag == "br":
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag == "div" and self._div_stack:
            if self._div_stack.pop():
                self._flush()
                self._main_depth -= 1
                return
        if not self._main_depth:
            return
        if tag in DROP_TAGS:
            self._drop_depth = max(0, self._drop_depth - 1)
        elif tag == "a" and self._headerlink_depth:
            self._headerlink_depth -= 1
        elif tag in BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._main_depth and not self._drop_depth and not self._headerlink_depth:
            self._buf.append(data)


def page_paragraphs(path: str) -> tuple[str, list[str]]:
    """(title, paragraphs) of one HTML page."""
    parser = _MainTextParser()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    title = re.sub(r"\s+", " ", parser.title).split(" — ")[0].strip()
    # A "paragraph" of a few characters is a table cell or a stray label; keep it joined to
    # the prose around it only if it carries words.
    paragraphs = [p for p in parser.paragraphs if len(p) >= 3]
    return title, paragraphs


def group_paragraphs(paragraphs: list[str], max_chars: int) -> list[str]:
    """Greedily group whole paragraphs into documents of at most `max_chars` characters
    (a single longer paragraph becomes a document of its own)."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        if current and size + len(p) + 1 > max_chars:
            docs.append("\n".join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + 1
    if current:
        docs.append("\n".join(current))
    return docs


def html_pages(root: str) -> list[str]:
    pages = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".html"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if os.path.dirname(rel) == "" and SKIP_PAGES.match(name):
                continue
            pages.append(rel)
    return sorted(pages)


def is_validation(url: str, fraction: float) -> bool:
    return hashlib.sha256(url.encode("utf-8")).digest()[0] < int(256 * fraction)


def write_jsonl_gz(path: str, records: list[dict[str, str]]) -> None:
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(raw.getvalue())


def licence_text(root: str) -> str:
    _, paragraphs = page_paragraphs(os.path.join(root, "license.html"))
    header = (
        "The t5lite demo corpus is plain text extracted from the HTML documentation of Python "
        "3.11 (Debian package python3.11-doc), by tasks/demo/make_corpus.py.\n"
        "The documentation is Copyright (c) 2001-2023 Python Software Foundation and is "
        "distributed under the PSF License Agreement reproduced below.\n\n"
    )
    return header + "\n\n".join(paragraphs) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--html_root", default=DEFAULT_HTML_ROOT)
    ap.add_argument("--out_dir", default=OUT_DIR)
    ap.add_argument("--max_doc_chars", type=int, default=8000)
    ap.add_argument("--validation_fraction", type=float, default=0.04)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.html_root):
        print(f"error: {args.html_root} not found; run `apt-get install -y python3-doc` first",
              file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    chars = {"train": 0, "validation": 0}
    for rel in html_pages(args.html_root):
        title, paragraphs = page_paragraphs(os.path.join(args.html_root, rel))
        for i, text in enumerate(group_paragraphs(paragraphs, args.max_doc_chars)):
            if len(text) < 200:  # a stub page (e.g. a redirect) is not a document
                continue
            url = f"https://docs.python.org/3.11/{rel}#part-{i}"
            split = "validation" if is_validation(url, args.validation_fraction) else "train"
            splits[split].append({"text": text, "url": url, "title": title})
            chars[split] += len(text)
    for split, records in splits.items():
        write_jsonl_gz(os.path.join(args.out_dir, f"{split}.jsonl.gz"), records)
        print(f"{split}: {len(records)} documents, {chars[split] / 1e6:.2f} M characters")
    with open(os.path.join(args.out_dir, "LICENSE.txt"), "w", encoding="utf-8") as f:
        f.write(licence_text(args.html_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
