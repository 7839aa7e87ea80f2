"""The browser's offline search: a SQLite FTS5 index (part of Python's sqlite3) over a folder of notes
(Markdown, text, reStructuredText, HTML), kept in the user's cache folder and updated incrementally:
only files whose size or modification time changed are read again, deleted files leave the index."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ossgguf.errors import OssggufError

log = logging.getLogger(__name__)

SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".org", ".html", ".htm"}
MAX_FILE_BYTES = 10 << 20  # larger files are not indexed (logs, dumps)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT UNIQUE, mtime_ns INTEGER, size INTEGER);
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(title, body, tokenize = 'porter unicode61');
"""


@dataclass
class Hit:
    path: str  # relative to the folder, with /
    title: str
    snippet: str


def is_html(path: str) -> bool:
    return path.lower().endswith((".html", ".htm"))


def document_text(path: Path) -> tuple[str, str]:
    """(title, text) of a file: HTML turned into text, a Markdown file titled by its first heading."""
    raw = path.read_bytes()[:MAX_FILE_BYTES].decode("utf-8", errors="replace")
    if is_html(path.name):
        from .web import html_page

        title, text, _ = html_page(raw, "")
        return title or path.stem, re.sub(r"【\d+†([^†】]*)(?:†[^】]*)?】", r"\1", text)  # link text, not markup
    m = re.search(r"^#\s+(.+)$", raw, re.MULTILINE)
    return (m.group(1).strip() if m else path.stem), raw


class LocalIndex:
    """`update()` brings the index up to date with the folder; `search(query, topn)` ranks by BM25."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise OssggufError(f"--browser-source local:{folder}: not a folder")
        key = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ossgguf" / "search"
        self.db = cache / f"{self.folder.name or 'root'}-{key}.sqlite"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the server's worker threads share one index
        self._conn = sqlite3.connect(self.db, check_same_thread=False)
        self._conn.executescript(_SCHEMA)

    def _files(self) -> dict[str, Path]:
        out = {}
        for root, dirs, names in os.walk(self.folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .obsidian, ...
            for name in names:
                p = Path(root) / name
                if p.suffix.lower() in SUFFIXES and not name.startswith(".") and p.is_file():
                    out[p.relative_to(self.folder).as_posix()] = p
        return out

    def update(self) -> tuple[int, int]:
        """Index new and changed files, drop deleted ones: (files read, files removed)."""
        with self._lock, self._conn as c:
            known = {path: (fid, mt, size) for fid, path, mt, size in c.execute("SELECT id, path, mtime_ns, size FROM files")}
            found = self._files()
            read = 0
            for rel, p in found.items():
                st = p.stat()
                old = known.get(rel)
                if old and old[1:] == (st.st_mtime_ns, st.st_size):
                    continue
                if st.st_size > MAX_FILE_BYTES:
                    log.info("not indexed (over %d bytes): %s", MAX_FILE_BYTES, p)
                    continue
                try:
                    title, text = document_text(p)
                except OSError as e:
                    log.warning("cannot index %s: %s", p, e)
                    continue
                if old:
                    c.execute("DELETE FROM docs WHERE rowid = ?", (old[0],))
                    c.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE id = ?", (st.st_mtime_ns, st.st_size, old[0]))
                    fid = old[0]
                else:
                    fid = c.execute("INSERT INTO files (path, mtime_ns, size) VALUES (?, ?, ?)",
                                    (rel, st.st_mtime_ns, st.st_size)).lastrowid
                c.execute("INSERT INTO docs (rowid, title, body) VALUES (?, ?, ?)", (fid, title, text))
                read += 1
            gone = [(v[0],) for k, v in known.items() if k not in found]
            c.executemany("DELETE FROM docs WHERE rowid = ?", gone)
            c.executemany("DELETE FROM files WHERE id = ?", gone)
        return read, len(gone)

    def search(self, query: str, topn: int = 10) -> list[Hit]:
        words = re.findall(r"\w+", query)
        if not words:
            return []
        # every word quoted (FTS5 syntax is not the model's to write), any of them may match; BM25 ranks
        match = " OR ".join('"' + w.replace('"', "") + '"' for w in words)
        with self._lock:
            rows = self._conn.execute(
                "SELECT files.path, docs.title, snippet(docs, 1, '', '', '…', 24) FROM docs "
                "JOIN files ON files.id = docs.rowid WHERE docs MATCH ? ORDER BY bm25(docs, 5.0, 1.0) LIMIT ?",
                (match, topn)).fetchall()
        return [Hit(p, t, " ".join(s.split())) for p, t, s in rows]

    def path(self, rel: str) -> Path:
        """The file `rel` names, refused unless it is inside the folder and indexed."""
        p = (self.folder / rel).resolve()
        if not p.is_relative_to(self.folder) or p.suffix.lower() not in SUFFIXES or not p.is_file():
            raise OssggufError(f"no document {rel!r} in the local index")
        return p

    def close(self) -> None:
        self._conn.close()
