"""SQLite storage of the labeling app: items, labelers, labels.

- **Items**: a prompt and its K responses (and optional gold, source, meta).
- **Labelers**: a name and a token, stored only as its SHA-256 hash; admins see the admin page.
- **Labels**: one per (item, labeler) — a ranking with ties, rubric scores, a comment, or a
  skip. A submission carries a client-made id; resubmitting it (a double click, a retry
  after a lost reply) returns the stored label instead of storing a second one.
- **Scheduling**: a labeler gets the item they were given and have not answered yet, else
  the item closest to complete among those still short of ``overlap`` labels (counting
  labels and other labelers' open assignments), oldest first — never one they labelled or
  skipped. Serving an item assigns it; a label is accepted only for an item assigned to
  its labeler. Assignments left open for ``ASSIGNMENT_TTL`` seconds stop counting.

One connection per call, WAL mode and ``BEGIN IMMEDIATE`` for writes make it safe for a
threaded server and for several processes on one file.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LabelStore", "StoreError", "NotAssigned", "hash_token", "RUBRIC_KEYS"]

ASSIGNMENT_TTL = 1800.0

RUBRIC_KEYS = ("helpful", "honest", "harmless", "concise")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,
    gold TEXT,
    source TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labelers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    submission TEXT NOT NULL UNIQUE,
    skipped INTEGER NOT NULL DEFAULT 0,
    ranking TEXT,
    rubric TEXT,
    comment TEXT,
    seconds REAL,
    created REAL NOT NULL,
    UNIQUE (item_id, labeler_id)
);
CREATE INDEX IF NOT EXISTS labels_by_item ON labels(item_id);
CREATE TABLE IF NOT EXISTS assignments (
    item_id INTEGER NOT NULL REFERENCES items(id),
    labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    served REAL NOT NULL,
    PRIMARY KEY (item_id, labeler_id)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(ValueError):
    """A request the store refuses (bad ranking, unknown item, ...)."""


class NotAssigned(StoreError):
    """A label for an item that was not given to this labeler."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LabelStore:
    def __init__(self, path: str | Path, *, overlap: int | None = None):
        self.path = str(path)
        if not self.path.startswith(":"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)
            if overlap is not None:
                db.execute("INSERT OR REPLACE INTO settings VALUES ('overlap', ?)", (str(int(overlap)),))

    @contextmanager
    def _db(self, write: bool = False):
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=60000")
            db.row_factory = sqlite3.Row
            if write:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            else:
                yield db
        finally:
            db.close()

    # ------------------------------------------------------------------ settings
    @property
    def overlap(self) -> int:
        with self._db() as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'overlap'").fetchone()
        return int(row[0]) if row else 1

    # ------------------------------------------------------------------ labelers
    def add_labeler(self, name: str, *, admin: bool = False) -> str:
        """Create a labeler; returns their token (shown once: only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 64:
            raise StoreError("a labeler's name must be 1-64 characters")
        token = secrets.token_urlsafe(24)
        try:
            with self._db(write=True) as db:
                db.execute("INSERT INTO labelers (name, token_hash, is_admin, created) VALUES (?, ?, ?, ?)",
                           (name, hash_token(token), int(admin), time.time()))
        except sqlite3.IntegrityError:
            raise StoreError(f"a labeler named {name!r} exists already") from None
        return token

    def labeler_by_token(self, token: str | None) -> dict | None:
        if not token:
            return None
        with self._db() as db:
            row = db.execute("SELECT id, name, is_admin FROM labelers WHERE token_hash = ?",
                             (hash_token(token),)).fetchone()
        return dict(row) if row else None

    def labelers(self) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT id, name, is_admin FROM labelers ORDER BY id")]

    # ------------------------------------------------------------------ items
    def add_items(self, records: list[dict], source: str = "") -> list[int]:
        """Add ``{prompt, responses, gold?}`` records (already validated); returns their ids.
        Gold, when given, is kept for the record and never shown to labelers."""
        now = time.time()
        ids = []
        with self._db(write=True) as db:
            for r in records:
                cur = db.execute("INSERT INTO items (prompt, responses, gold, source, created) VALUES (?, ?, ?, ?, ?)",
                                 (json.dumps(r["prompt"], ensure_ascii=False),
                                  json.dumps(r["responses"], ensure_ascii=False),
                                  None if r.get("gold") is None else json.dumps(r["gold"]), source, now))
                ids.append(cur.lastrowid)
        return ids

    def item_ids(self, source: str) -> list[int]:
        """The ids of the items imported with this ``source`` tag."""
        with self._db() as db:
            return [r[0] for r in db.execute("SELECT id FROM items WHERE source = ? ORDER BY id", (source,))]

    def label_count(self, item_ids: list[int]) -> int:
        """Labels (not skips) of these items."""
        if not item_ids:
            return 0
        with self._db() as db:
            marks = ",".join("?" * len(item_ids))
            return int(db.execute(f"SELECT COUNT(*) FROM labels WHERE skipped = 0 AND item_id IN ({marks})",
                                  item_ids).fetchone()[0])

    def _item(self, row) -> dict:
        return {"id": row["id"], "prompt": json.loads(row["prompt"]), "responses": json.loads(row["responses"]),
                "gold": json.loads(row["gold"]) if row["gold"] else None, "source": row["source"]}

    def item(self, item_id: int) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return self._item(row) if row else None

    def next_item(self, labeler_id: int) -> dict | None:
        """The item this labeler should label next (see the module docstring), assigned to
        them; None when nothing is left for them."""
        now = time.time()
        with self._db(write=True) as db:
            row = db.execute(
                """SELECT i.* FROM items i JOIN assignments a ON a.item_id = i.id AND a.labeler_id = ?
                   WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.labeler_id = ?)
                   ORDER BY a.served LIMIT 1""", (labeler_id, labeler_id)).fetchone()
            if row is None:
                row = db.execute(
                    """SELECT i.*,
                         (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id AND l.skipped = 0)
                         + (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND a.labeler_id != ?
                              AND a.served > ? AND NOT EXISTS (SELECT 1 FROM labels l
                                  WHERE l.item_id = a.item_id AND l.labeler_id = a.labeler_id)) AS n
                       FROM items i
                       WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.labeler_id = ?)
                       AND n < ?
                       ORDER BY n DESC, i.id LIMIT 1""",
                    (labeler_id, now - ASSIGNMENT_TTL, labeler_id, self.overlap)).fetchone()
                if row is None:
                    return None
                db.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?)", (row["id"], labeler_id, now))
        return self._item(row)

    # ------------------------------------------------------------------ labels
    def submit(self, labeler_id: int, item_id: int, submission: str, *, ranking: list | None = None,
               rubric: dict | None = None, comment: str = "", skipped: bool = False,
               seconds: float | None = None) -> tuple[dict, bool]:
        """Store one label; returns ``(label, created)``. The same ``submission`` id again
        returns the stored label with ``created`` False; a second, different label of the
        same item by the same labeler is refused."""
        if not isinstance(submission, str) or not 8 <= len(submission) <= 128:
            raise StoreError("submission must be a client-made id of 8-128 characters")
        item = self.item(item_id)
        if item is None:
            raise StoreError(f"no item {item_id}")
        if not skipped:
            ranking = _check_ranking(ranking, len(item["responses"]))
            rubric = _check_rubric(rubric)
        if not isinstance(comment, str) or len(comment) > 4000:
            raise StoreError("comment must be text of at most 4000 characters")
        with self._db(write=True) as db:
            old = db.execute("SELECT * FROM labels WHERE submission = ?", (submission,)).fetchone()
            if old is not None:
                if old["labeler_id"] != labeler_id:
                    raise StoreError("that submission id belongs to another labeler")
                return _label(old), False
            if not db.execute("SELECT 1 FROM assignments WHERE item_id = ? AND labeler_id = ?",
                              (item_id, labeler_id)).fetchone():
                raise NotAssigned(f"item {item_id} was not given to you")
            if db.execute("SELECT 1 FROM labels WHERE item_id = ? AND labeler_id = ?",
                          (item_id, labeler_id)).fetchone():
                raise StoreError(f"item {item_id} is labelled by you already")
            cur = db.execute(
                "INSERT INTO labels (item_id, labeler_id, submission, skipped, ranking, rubric, comment, seconds, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, labeler_id, submission, int(skipped), None if skipped else json.dumps(ranking),
                 None if skipped else json.dumps(rubric or {}), comment, seconds, time.time()))
            row = db.execute("SELECT * FROM labels WHERE id = ?", (cur.lastrowid,)).fetchone()
        return _label(row), True

    def labels(self, labeler_id: int | None = None, *, include_skipped: bool = False) -> list[dict]:
        q = ("SELECT l.*, lb.name AS rater FROM labels l JOIN labelers lb ON lb.id = l.labeler_id WHERE 1 = 1"
             + ("" if include_skipped else " AND l.skipped = 0") + (" AND l.labeler_id = ?" if labeler_id else "")
             + " ORDER BY l.id")
        with self._db() as db:
            return [_label(r) | {"rater": r["rater"]} for r in db.execute(q, (labeler_id,) if labeler_id else ())]

    def progress(self, labeler_id: int | None = None) -> dict:
        with self._db() as db:
            items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            labels = db.execute("SELECT COUNT(*) FROM labels WHERE skipped = 0").fetchone()[0]
            done = db.execute("SELECT COUNT(*) FROM (SELECT item_id FROM labels WHERE skipped = 0 GROUP BY item_id "
                              "HAVING COUNT(*) >= ?)", (self.overlap,)).fetchone()[0]
            out = {"items": items, "labels": labels, "items_complete": done, "overlap": self.overlap,
                   "labels_needed": items * self.overlap}
            if labeler_id is not None:
                mine = db.execute("SELECT COUNT(*), SUM(skipped) FROM labels WHERE labeler_id = ?", (labeler_id,)).fetchone()
                out["mine"] = mine[0] - (mine[1] or 0)
                out["skipped"] = mine[1] or 0
                out["left_for_me"] = db.execute(
                    """SELECT COUNT(*) FROM items i WHERE NOT EXISTS
                       (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.labeler_id = ?)
                       AND (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id AND l.skipped = 0) < ?""",
                    (labeler_id, self.overlap)).fetchone()[0]
        return out

    def rankings(self) -> list:
        """Every label as a :class:`tether.data.schemas.Ranking` (rater = the labeler's name)."""
        from tether.data.schemas import parse_ranking

        items = {}
        out = []
        for lab in self.labels():
            item = items.get(lab["item_id"]) or items.setdefault(lab["item_id"], self.item(lab["item_id"]))
            rec = {"prompt": item["prompt"], "responses": item["responses"], "ranking": lab["ranking"],
                   "rater": lab["rater"], "item": lab["item_id"]}
            out.append(parse_ranking(rec, "labels.sqlite", lab["id"], allow_empty_responses=True))
        return out


def _label(row) -> dict:
    return {"id": row["id"], "item_id": row["item_id"], "labeler_id": row["labeler_id"],
            "submission": row["submission"], "skipped": bool(row["skipped"]),
            "ranking": json.loads(row["ranking"]) if row["ranking"] else None,
            "rubric": json.loads(row["rubric"]) if row["rubric"] else None,
            "comment": row["comment"], "seconds": row["seconds"], "created": row["created"]}


def _check_ranking(ranking, k: int) -> list:
    """A ranking of indices 0..k−1, best first, nested lists for ties (as in the data schema)."""
    if not isinstance(ranking, list):
        raise StoreError("ranking must be a list of response indices, best first")
    flat = []
    for entry in ranking:
        group = entry if isinstance(entry, list) else [entry]
        if not group or any(isinstance(i, bool) or not isinstance(i, int) for i in group):
            raise StoreError(f"ranking must list each of 0..{k - 1} once (a nested list for a tie), got {ranking!r}")
        flat.extend(group)
    if sorted(flat) != list(range(k)):
        raise StoreError(f"ranking must list each of 0..{k - 1} once (a nested list for a tie), got {ranking!r}")
    return [e if not isinstance(e, list) or len(e) > 1 else e[0] for e in ranking]


def _check_rubric(rubric) -> dict:
    if rubric is None:
        return {}
    if not isinstance(rubric, dict) or any(k not in RUBRIC_KEYS for k in rubric):
        raise StoreError(f"rubric must map some of {list(RUBRIC_KEYS)} to scores 1-5")
    for k, v in rubric.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5):
            raise StoreError(f"rubric score {k!r} must be 1-5, got {v!r}")
    return {k: v for k, v in rubric.items() if v is not None}
