"""Runtime: the live objects a running proxy shares (one instance per process).

Built by ``proxy.app`` (the composition root); read by the handler and the admin API. The
services built on top of it (credits, flusher, webhooks, ...) are not looked up here: each is
passed to the constructor that needs it, and admin routes reach theirs through one typed
``web.AppKey`` each (``proxy.admin.api``).
``rules`` is swapped whole on hot reload; readers take one reference per request, so a
request is priced by exactly one rules version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.config import Config
from proxy.pricing import Price, meter_prices
from proxy.rules import RuleSet
from proxy.store.db import Store
from proxy.store.keys import KeyCache
from proxy.store.protocols import Storage
from proxy.store.sqlite import SqliteStorage, as_storage
from proxy.stripe.prices import PriceCache

if TYPE_CHECKING:
    from proxy.request.forward import Upstream


@dataclass
class Runtime:
    cfg: Config
    rules: RuleSet
    store: Store
    keys: KeyCache
    upstream: Upstream
    rules_error: str | None = None
    price_cache: PriceCache | None = None
    storage: Storage | None = None      # the table owners; the SQLite ones on ``store`` if unset

    def owners(self) -> Storage:
        if self.storage is None:
            self.storage = as_storage(SqliteStorage.on(self.store))
        return self.storage

    def prices(self) -> dict[str, Price]:
        """Each priced meter's Price: Stripe's (fetched for ``price_id``) when cached, else
        the rules file's."""
        return meter_prices(self.rules.meters, self.price_cache)
