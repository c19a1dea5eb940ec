"""Rules versions on SQLite (the ``RulesHistory`` owner): the only writer of
``rules_versions``, the text of every rules version that ever priced a request."""

from __future__ import annotations

from proxy.store.access import Writer
from proxy.store.protocols import RulesText


class SqliteRulesHistory:
    def __init__(self, db: Writer) -> None:
        self.db = db

    async def remember(self, version: str, files: str, at: int) -> bool:
        new: bool = self.db.execute_write(lambda c: c.execute(
            "INSERT OR IGNORE INTO rules_versions(version, first_loaded_at, files)"
            " VALUES (?,?,?)", (version, at, files)).rowcount == 1)
        return new

    async def get(self, version: str) -> RulesText | None:
        row = self.db.conn.execute("SELECT files, first_loaded_at FROM rules_versions"
                                   " WHERE version=?", (version,)).fetchone()
        return None if row is None else RulesText(version, str(row[0]), int(row[1]))

    async def newest(self) -> str | None:
        row = self.db.conn.execute("SELECT version FROM rules_versions ORDER BY"
                                   " first_loaded_at DESC, rowid DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])
