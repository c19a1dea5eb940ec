"""The PostgreSQL backend of fleet mode: connection pool, schema and migrations.

Only fleet code (proxy.fleet) imports this package; the SQLite default never does.
"""
