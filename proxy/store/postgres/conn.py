"""``Conn``: what every PostgreSQL verb takes, a direct asyncpg connection or one borrowed
from the pool (asyncpg hands out a proxy object for those)."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
