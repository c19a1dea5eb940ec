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

Migration 3 is SQLite's migration 8 (the billing lifecycle, docs/credits.md): a grant's
``effective_at`` and ``carried`` part, the time of the subscription event that last set a
customer's anchor (``customers.created_at`` exists since migration 1), ``plan_invoices``
(each subscription invoice a plan grant waits on or was paid by) and ``trueups`` (each ended
period's minimum-commitment decision). Migration 4 is SQLite's migration 9:
``customers.currency``. Migration 5 appends a grant's ``expire``/``void`` once fleet-wide.
Migration 6 keeps per-grant state in step with the shared ledger (``grants.used``,
``credit_accounts.debt`` and ``rev``; ``proxy.store.postgres.grant_debits``).
Migration 7 is SQLite's migration 10: ``customers.credit_mode`` and
``grant_mirrors`` (the monetary credits mode, docs/credits.md). Migration 8 is SQLite's
migration 12: ``invoice_finalized``. Migration 9 counts debt shipped for a customer
before it had a credit account (``settled`` and ``debt``). Migration 10 is SQLite's
migration 14: a true-up's ``sending`` status and ``trueups.stripe_customer_id``. Migration 11
is SQLite's migration 15: ``outbox.first_attempt_at``. Migration 12: ``members.instance`` and
``leader_leases.instance``, the token of the one live process per member id
(``proxy.store.postgres.members.claim``). Migration 13 is SQLite's migration 17: an index on
``customers.stripe_customer_id``. Migration 14: ``audit_pruned.before_ms``, the highest
cutoff the audit retention ever deleted ``usage_ledger`` rows below (written by the prune's
own statement), so a start can tell a journal row that never shipped from one the retention
pruned (``proxy.store.postgres.journal.shipped_as``); it starts at the migration's time (what
was pruned before it is unknown).
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
    # 3: the billing lifecycle (SQLite's migration 8)
    """
    ALTER TABLE grants ADD COLUMN effective_at BIGINT,
        ADD COLUMN carried BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE customers ADD COLUMN anchor_event_at BIGINT;
    CREATE TABLE plan_invoices (
        invoice_id TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        customer_id TEXT NOT NULL,
        subscription TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'paid', 'unpaid')),
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX plan_invoices_grant ON plan_invoices(grant_id);
    CREATE INDEX plan_invoices_customer ON plan_invoices(customer_id, state);
    CREATE INDEX grants_period ON grants(customer_id, period_start);
    CREATE TABLE trueups (
        customer_id TEXT NOT NULL,
        period_start BIGINT NOT NULL,
        period_end BIGINT NOT NULL,
        commitment BIGINT NOT NULL,
        charged BIGINT NOT NULL,
        amount BIGINT NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('none', 'sent')),
        invoice_item TEXT,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (customer_id, period_start)
    );
    """,
    # 4: the currency a customer is charged in (SQLite's migration 9)
    """
    ALTER TABLE customers ADD COLUMN currency TEXT;
    """,
    # 5: a grant is expired or voided at most once for the whole fleet (every member runs
    # the expiry loop; two admin voids may race): the second such entry is not appended
    """
    CREATE UNIQUE INDEX credit_entries_closed_once ON credit_entries(grant_id, kind)
        WHERE kind IN ('expire', 'void');
    """,
    # 6: per-grant state kept in step with the shared ledger (proxy.store.postgres.grant_debits):
    # ``grants.used`` (every entry against the grant), ``credit_accounts.debt`` (debt less
    # repay) and ``credit_accounts.rev`` (moved by every credit change of the customer, so a
    # member reloads only the customers that changed), all by one statement-level trigger
    # in the writer's own transaction
    """
    ALTER TABLE grants ADD COLUMN used BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE credit_accounts ADD COLUMN debt BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN rev BIGINT NOT NULL DEFAULT 0;
    CREATE SEQUENCE credit_rev;
    CREATE INDEX credit_accounts_rev ON credit_accounts(rev);
    UPDATE grants g SET used = s.t FROM (
        SELECT grant_id, sum(amount) AS t FROM credit_entries WHERE grant_id IS NOT NULL
        GROUP BY grant_id) s WHERE g.id = s.grant_id;
    -- before this migration a fleet's shipped spending was kept only in
    -- credit_accounts.settled (no grant-level entries): what settled holds beyond the debit
    -- entries is allocated to the grants in burn order (priority, earliest expiry, oldest),
    -- each up to what it has left, so a spent grant does not read as full
    WITH todo AS (
        SELECT a.customer_id, a.settled - COALESCE((
            SELECT sum(e.amount) FROM credit_entries e
            WHERE e.customer_id = a.customer_id AND e.kind = 'debit'), 0) AS t
        FROM credit_accounts a),
    room AS (
        SELECT g.id, g.customer_id, GREATEST(g.amount - g.used, 0) AS r,
               sum(GREATEST(g.amount - g.used, 0)) OVER (
                   PARTITION BY g.customer_id
                   ORDER BY g.priority, COALESCE(g.expires_at, 4611686018427387904),
                            g.created_at, g.id) AS upto
        FROM grants g)
    UPDATE grants g SET used = g.used + LEAST(room.r, todo.t - (room.upto - room.r))
    FROM room JOIN todo ON todo.customer_id = room.customer_id
    WHERE g.id = room.id AND todo.t > room.upto - room.r;
    INSERT INTO credit_accounts(customer_id)
        SELECT DISTINCT e.customer_id FROM credit_entries e JOIN customers c ON c.id = e.customer_id
        ON CONFLICT (customer_id) DO NOTHING;
    UPDATE credit_accounts a SET debt = s.d, rev = nextval('credit_rev') FROM (
        SELECT customer_id, sum(CASE kind WHEN 'debt' THEN amount ELSE -amount END) AS d
        FROM credit_entries WHERE kind IN ('debt', 'repay') GROUP BY customer_id) s
        WHERE a.customer_id = s.customer_id;

    CREATE FUNCTION credit_entries_totals() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE grants g SET used = g.used + s.t FROM (
            SELECT grant_id, sum(amount) AS t FROM new_entries WHERE grant_id IS NOT NULL
            GROUP BY grant_id) s
        WHERE g.id = s.grant_id;
        UPDATE credit_accounts a SET debt = a.debt + s.d, rev = nextval('credit_rev') FROM (
            SELECT customer_id, sum(CASE kind WHEN 'debt' THEN amount
                                              WHEN 'repay' THEN -amount ELSE 0 END) AS d
            FROM new_entries GROUP BY customer_id) s
        WHERE a.customer_id = s.customer_id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER credit_entries_totals AFTER INSERT ON credit_entries
        REFERENCING NEW TABLE AS new_entries
        FOR EACH STATEMENT EXECUTE FUNCTION credit_entries_totals();
    """,
    # 7: the monetary credits mode (SQLite's migration 10): a customer's mode, and each
    # local grant's Stripe credit grant mirror (owner proxy/store/postgres/mirrors.py)
    """
    ALTER TABLE customers ADD COLUMN credit_mode TEXT
        CHECK (credit_mode IS NULL OR credit_mode IN ('units', 'monetary'));
    CREATE TABLE grant_mirrors (
        grant_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        want TEXT NOT NULL CHECK (want IN ('live', 'void')),
        done TEXT NOT NULL DEFAULT 'none' CHECK (done IN ('none', 'live', 'void')),
        stripe_grant_id TEXT,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'mirrored', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX grant_mirrors_due ON grant_mirrors(status, next_attempt_at);
    """,
    # 8: the latest finalized invoice period end per customer (SQLite's migration 12;
    # owner proxy/store/postgres/mirrors.py)
    """
    CREATE TABLE invoice_finalized (
        customer_id TEXT PRIMARY KEY,
        period_end BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    """,
    # 9: usage shipped as debt for a customer with no credit account yet (a block customer
    # admitted offline before its first grant) was counted neither in ``settled`` (the
    # settle updated no row) nor in ``debt`` (the migration-6 trigger updates existing rows
    # only), so its first grant repaid nothing (repayments are capped by ``debt``).
    # ``leases.settle`` now makes the account first; here the accounts are made and such
    # uncounted debt is counted in both
    """
    INSERT INTO credit_accounts(customer_id)
        SELECT DISTINCT e.customer_id FROM credit_entries e JOIN customers c ON c.id = e.customer_id
        ON CONFLICT (customer_id) DO NOTHING;
    UPDATE credit_accounts a SET debt = s.d, settled = a.settled + (s.d - a.debt),
        rev = nextval('credit_rev') FROM (
        SELECT customer_id, sum(CASE kind WHEN 'debt' THEN amount ELSE -amount END) AS d
        FROM credit_entries WHERE kind IN ('debt', 'repay') GROUP BY customer_id) s
        WHERE a.customer_id = s.customer_id AND a.debt <> s.d;
    """,
    # 10: a commitment true-up's parameters frozen before its invoice item is created
    # (SQLite's migration 14): status ``sending`` and the Stripe customer it is for
    """
    ALTER TABLE trueups ADD COLUMN stripe_customer_id TEXT;
    ALTER TABLE trueups DROP CONSTRAINT trueups_status_check;
    ALTER TABLE trueups ADD CONSTRAINT trueups_status_check
        CHECK (status IN ('none', 'sending', 'sent'));
    """,
    # 11: when an outbox row's first call that Stripe may have applied began (SQLite's
    # migration 15; proxy.flusher.RESEND_HORIZON). Rows attempted before get their creation
    # time: at or before their first call
    """
    ALTER TABLE outbox ADD COLUMN first_attempt_at DOUBLE PRECISION;
    UPDATE outbox SET first_attempt_at = created_at WHERE attempts > 0 AND status <> 'sent';
    """,
    # 12: one live process per member id (docs/fleet.md, "One process per member id"): the
    # instance token the running process claimed (NULL: released, or never claimed), and
    # the instance that holds a duty, whose fence changes when the instance does
    """
    ALTER TABLE members ADD COLUMN instance TEXT;
    ALTER TABLE leader_leases ADD COLUMN instance TEXT;
    """,
    # 13: SQLite's migration 17: customers by Stripe customer id (an index, not a scan)
    """
    CREATE INDEX customers_stripe_customer ON customers(stripe_customer_id);
    """,
    # 14: the highest cutoff the audit retention deleted usage_ledger rows below
    # (proxy.store.postgres.usage.prune_audit); unknown before this migration: its time
    """
    CREATE TABLE audit_pruned (id INTEGER PRIMARY KEY CHECK (id = 0), before_ms BIGINT NOT NULL);
    INSERT INTO audit_pruned (id, before_ms)
        VALUES (0, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT);
    """,
)

ALL_MIGRATIONS: tuple[str, ...] = MIGRATIONS + OWNER_MIGRATIONS
