"""English text that ships with Python or inside a PyPI wheel, cleaned once and cached.

`wikipedia_text()`: gensim's test excerpt of 206 Wikipedia articles, wiki markup stripped (about 3.7 M
characters, CC BY-SA). `pydoc_text()`: the Python documentation topics in `pydoc_data` (about 0.46 M characters).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import os
import re
from pathlib import Path

from shared.data.bundled import package_file

_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CLEANER_VERSION = 4  # bump when the cleaning changes, so caches are rebuilt


def cache_dir() -> Path:
    root = os.environ.get("FORMERLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "formerlab"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced `open_ ... close` spans (templates and tables nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_NON_TEXT_LINK = re.compile(r"(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):", re.I)


def _resolve_links(text: str) -> str:
    """[[target|shown]] -> shown, innermost first (image captions hold links); files and categories vanish."""
    innermost = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)  # captions span lines, hold [single] brackets

    def replace(match: re.Match) -> str:
        inside = match.group(1)
        return "" if _NON_TEXT_LINK.match(inside) else inside.rsplit("|", 1)[-1]

    while True:
        text, count = innermost.subn(replace, text)
        if not count:
            return text


def clean_wikitext(markup: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, files and categories removed, links
    replaced by their text, headings and emphasis unmarked, one paragraph per line."""
    text = html.unescape(html.unescape(markup))  # the dump escapes entities twice (&amp;nbsp;)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<math[^>]*>.*?</math>", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _resolve_links(text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#REDIRECT") or line[:1] in ("|", "!", "{", "}"):
            continue
        line = line.lstrip("*#:; ")  # list items keep their text
        if len(line) > 1:
            lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)


def wikipedia_text() -> str:
    """The cleaned Wikipedia excerpt bundled with gensim (cached under ~/.cache/formerlab)."""
    dump = package_file("gensim", _WIKI_DUMP)
    key = hashlib.sha1(f"{dump.stat().st_size}-{CLEANER_VERSION}".encode()).hexdigest()[:12]
    cached = cache_dir() / f"wikipedia-{key}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    xml = bz2.open(dump, "rt", encoding="utf-8").read()
    pages = [clean_wikitext(p) for p in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)]
    text = "\n\n".join(p for p in pages if len(p) > 200)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(cached)  # atomic: concurrent ranks or jobs never read a half-written cache
    return text


def pydoc_text() -> str:
    """Python's documentation topics (`pydoc_data.topics`), always available."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))
