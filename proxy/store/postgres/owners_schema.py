"""What the storage owners (``proxy.store.postgres.storage``) add to the fleet schema.

The fleet schema (``proxy.store.postgres.schema``, migration 1) holds every table; the
owners need a few more things, appended here as migration 2 in the same numbered,
append-only scheme (``ALL_MIGRATIONS`` = the fleet's list + these):

- ``usage_ledger.audit_seq``: a global insertion order (identity) for the shipped usage
  ledger, which is the fleet's audit: ``AuditRecord.seq``, the export order and the prune
  order (``(member_id, seq)`` orders one member's rows only).
- ``usage_minute`` maintained from the usage ledger by a statement-level trigger with a
  transition table: every ``usage_ledger`` row that a shipping batch really inserts (a
  resend inserts nothing, ``ON CONFLICT DO NOTHING``) is added to its minute, in the
  shipper's own transaction. So the minutes count each shipped row exactly once, and the
  shipper (``proxy.store.postgres.shipping``) needs no change. The upsert runs in primary-key order,
  the same order the outbox's staging locks minutes in, so they never deadlock.
- ``webhook_events.arrival``, ``api_keys.ord``, ``rules_versions.ord``: arrival order
  (SQLite's ``rowid``) for the webhook cursor, the key listing and "newest" ties.
- ``credit_entries.member_id/member_seq/member_item``: a grant debit shipped from a
  member's journal row is keyed by the row's ``(member_id, seq)`` and its index, so a
  resend inserts nothing (``proxy.store.postgres.journal``).
- ``customers`` changes notify ``meterproxy_customers`` (key changes already notify
  ``meterproxy_keys``): ``Customers.data_version`` listens to both.
"""

from __future__ import annotations

from proxy.store.postgres.schema import MIGRATIONS

CUSTOMERS_CHANNEL = "meterproxy_customers"

OWNER_MIGRATIONS: tuple[str, ...] = (
    # 2: audit order, usage minutes from the shipped ledger, arrival orders, customer notify
    """
    ALTER TABLE usage_ledger ADD COLUMN audit_seq BIGINT GENERATED ALWAYS AS IDENTITY;
    CREATE UNIQUE INDEX usage_ledger_audit_seq ON usage_ledger(audit_seq);
    CREATE INDEX usage_ledger_at ON usage_ledger(at_ms);

    CREATE FUNCTION usage_ledger_minutes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO usage_minute AS u (customer_id, key_id, meter, minute, rules_version,
                                       quantity, requests, billable, covered)
        SELECT customer_id, key_id, meter, (at_ms / 60000) * 60, rules_version,
               sum(quantity), count(*), sum(billable), sum(quantity - billable)
        FROM new_rows GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (customer_id, key_id, meter, minute, rules_version) DO UPDATE
            SET quantity = u.quantity + EXCLUDED.quantity,
                requests = u.requests + EXCLUDED.requests,
                billable = u.billable + EXCLUDED.billable,
                covered = u.covered + EXCLUDED.covered;
        RETURN NULL;
    END $$;
    CREATE TRIGGER usage_ledger_minutes AFTER INSERT ON usage_ledger
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION usage_ledger_minutes();

    ALTER TABLE webhook_events ADD COLUMN arrival BIGINT GENERATED ALWAYS AS IDENTITY;
    CREATE UNIQUE INDEX webhook_events_arrival ON webhook_events(arrival);
    CREATE INDEX webhook_events_status ON webhook_events(status, arrival);
    ALTER TABLE api_keys ADD COLUMN ord BIGINT GENERATED ALWAYS AS IDENTITY;
    ALTER TABLE rules_versions ADD COLUMN ord BIGINT GENERATED ALWAYS AS IDENTITY;

    ALTER TABLE credit_entries ADD COLUMN member_id TEXT, ADD COLUMN member_seq BIGINT,
        ADD COLUMN member_item SMALLINT;
    CREATE UNIQUE INDEX credit_entries_shipped
        ON credit_entries(member_id, member_seq, member_item) WHERE member_id IS NOT NULL;

    CREATE FUNCTION customers_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('meterproxy_customers', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER customers_notify AFTER INSERT OR UPDATE OR DELETE ON customers
        FOR EACH STATEMENT EXECUTE FUNCTION customers_notify();
    """,
)

ALL_MIGRATIONS: tuple[str, ...] = MIGRATIONS + OWNER_MIGRATIONS
