"""Fleet mode: many meterproxy processes sharing one PostgreSQL (docs/fleet.md).

Dependencies point down: ``sizing`` and ``clock`` are pure leaves; ``leases``, ``shipping``,
``leader`` and ``keys`` own their tables through ``proxy.store.postgres``; ``book`` admits
against ``leases``; ``settings`` maps the config file onto them. Nothing in the SQLite
serving path imports this package.
"""
