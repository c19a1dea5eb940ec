"""PostgreSQL schema for fleet mode, as numbered migrations (the SQLite scheme's idea).

SQLite counts applied migrations in ``PRAGMA user_version`` (proxy/store/schema.py); PostgreSQL
has no such pragma, so the count lives in the one-row table ``meterproxy_schema(version)``.
Migrations only ever append; an applied migration is never edited. ``proxy.store.postgres.migrate``
applies the missing ones in one transaction, serialized across members by a
transaction-scoped advisory lock (safe behind a transaction pooler).

Migration 1 is the SQLite schema as of its migration 7 (same tables, same columns, same
CHECKs, integer micro-units and micro-credits as BIGINT, unix seconds as BIGINT where SQLite
keeps INTEGER seconds), plus what only a fleet needs:

- ``api_keys.version``: a monotonic change number (one sequence, bumped by a trigger on every
  insert and update, serialized by an advisory lock so versions commit in order); a
  ``pg_notify('meterproxy_keys', version)`` tells listeners (proxy.store.postgres.key_watch).
- ``credit_accounts``: per customer ``balance`` (credits granted, less expired and voided),
  ``settled`` (spent and shipped) and ``escrowed`` (held in live leases). Fixed-cost spending
  keeps ``settled + escrowed <= balance``; only post-response quantities above their hold can
  push ``settled`` past it (the stated overspend, paid back as debt).
- ``credit_leases``: one active lease per (customer, member) (partial unique index).
- ``members``, ``usage_ledger`` keyed ``(customer_id, member_id, seq, item)`` (the
  distribution column first, for sharding by customer), ``outbox`` with ``claim_fence``,
  ``dead_letters``, ``leader_leases``.
"""

from __future__ import annotations

KEYS_CHANNEL = "meterproxy_keys"

MIGRATIONS: tuple[str, ...] = (
    # 1: everything SQLite has at its migration 7, plus the fleet tables
    """
    CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
    INSERT INTO meta(k, v) VALUES ('install_id', substr(md5(random()::text), 1, 12));

    CREATE TABLE customers (
        id TEXT PRIMARY KEY,
        stripe_customer_id TEXT,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
        overage TEXT NOT NULL DEFAULT 'bill' CHECK (overage IN ('bill', 'block')),
        enforcement TEXT NOT NULL DEFAULT 'enforce',
        billing_anchor BIGINT,
        minimum_commitment BIGINT NOT NULL DEFAULT 0,
        suspended_for TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );

    CREATE SEQUENCE api_key_version;
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES customers(id),
        name TEXT NOT NULL DEFAULT '',
        hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT,
        version BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX api_keys_customer ON api_keys(customer_id);
    CREATE INDEX api_keys_version ON api_keys(version);
    -- versions must become visible in order, or a poller that saw version 7 would skip a
    -- version 6 committed after it: every key change takes one transaction-scoped lock
    -- before drawing its version (key changes are rare admin operations)
    CREATE FUNCTION api_keys_bump() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext('meterproxy_api_keys'));
        NEW.version := nextval('api_key_version');
        PERFORM pg_notify('meterproxy_keys', NEW.version::text);
        RETURN NEW;
    END $$;
    CREATE TRIGGER api_keys_bump BEFORE INSERT OR UPDATE ON api_keys
        FOR EACH ROW EXECUTE FUNCTION api_keys_bump();

    CREATE TABLE usage_minute (
        customer_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        minute BIGINT NOT NULL,
        rules_version TEXT NOT NULL,
        quantity BIGINT NOT NULL DEFAULT 0,
        requests BIGINT NOT NULL DEFAULT 0,
        billable BIGINT NOT NULL DEFAULT 0,
        covered BIGINT NOT NULL DEFAULT 0,
        reported BIGINT NOT NULL DEFAULT 0,
        reported_covered BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (customer_id, key_id, meter, minute, rules_version)
    );
    CREATE INDEX usage_minute_time ON usage_minute(minute);
    CREATE INDEX usage_minute_unreported ON usage_minute(minute)
        WHERE billable > reported OR covered > reported_covered;

    CREATE TABLE rules_versions (
        version TEXT PRIMARY KEY,
        first_loaded_at BIGINT NOT NULL,
        files TEXT NOT NULL
    );

    -- the Stripe outbox; claim_fence: the flusher leader's fence that claimed the row
    CREATE TABLE outbox (
        id BIGSERIAL PRIMARY KEY,
        identifier TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        event_name TEXT NOT NULL,
        covered BIGINT NOT NULL DEFAULT 0,
        value BIGINT NOT NULL,
        window_start BIGINT NOT NULL,
        timestamp BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'sent', 'dead', 'dry_run')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        sent_at BIGINT,
        sink TEXT,
        outcome TEXT,
        last_error TEXT,
        dead_at BIGINT,
        claim_fence BIGINT
    );
    CREATE INDEX outbox_status ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_customer ON outbox(customer_id, meter, timestamp);
    CREATE INDEX outbox_timestamp ON outbox(timestamp);
    -- the flusher claims pending rows in id order
    CREATE INDEX outbox_pending ON outbox(id) WHERE status = 'pending';
    CREATE TABLE carry (
        customer_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        event_name TEXT NOT NULL,
        remainder BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (customer_id, meter, event_name)
    );
    -- outbox rows given up on, kept for replay (SQLite keeps them as outbox status 'dead')
    CREATE TABLE dead_letters (
        outbox_id BIGINT PRIMARY KEY REFERENCES outbox(id),
        reason TEXT NOT NULL,
        dead_at BIGINT NOT NULL,
        replayed_at BIGINT
    );

    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES customers(id),
        amount BIGINT NOT NULL CHECK (amount > 0),
        priority INTEGER NOT NULL DEFAULT 50,
        expires_at BIGINT,
        source TEXT NOT NULL,
        idempotency_key TEXT,
        created_at BIGINT NOT NULL,
        period_start BIGINT,
        period_end BIGINT,
        UNIQUE (customer_id, idempotency_key)
    );
    CREATE INDEX grants_customer ON grants(customer_id);
    CREATE TABLE credit_entries (
        seq BIGSERIAL PRIMARY KEY,
        customer_id TEXT NOT NULL,
        grant_id TEXT REFERENCES grants(id),
        kind TEXT NOT NULL CHECK (kind IN ('debit', 'expire', 'void', 'refund', 'debt', 'repay')),
        amount BIGINT NOT NULL,
        request_id TEXT,
        meter TEXT,
        at_ms BIGINT NOT NULL,
        CHECK ((kind = 'debt') = (grant_id IS NULL))
    );
    CREATE INDEX credit_entries_grant ON credit_entries(grant_id);
    CREATE INDEX credit_entries_customer ON credit_entries(customer_id, at_ms);
    CREATE TABLE grant_payments (
        ref TEXT NOT NULL,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        paid BIGINT NOT NULL,
        PRIMARY KEY (ref, grant_id)
    );
    CREATE TABLE payment_links (
        payment_ref TEXT NOT NULL,
        invoice_ref TEXT NOT NULL,
        PRIMARY KEY (payment_ref, invoice_ref)
    );
    CREATE TABLE clawbacks (
        key TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        minor BIGINT NOT NULL,
        credits BIGINT NOT NULL,
        event_id TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );

    -- alerts-fired, once per (customer, period, threshold) fleet-wide by the UNIQUE
    CREATE TABLE alerts (
        id BIGSERIAL PRIMARY KEY,
        customer_id TEXT NOT NULL,
        period_key TEXT NOT NULL,
        threshold TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead', 'logged')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error TEXT,
        sent_at BIGINT,
        UNIQUE (customer_id, period_key, threshold)
    );
    CREATE INDEX alerts_due ON alerts(status, next_attempt_at);
    -- Stripe webhook dedupe, fleet-wide by the primary key
    CREATE TABLE webhook_events (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        created BIGINT,
        payload TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        processed_at BIGINT,
        status TEXT NOT NULL DEFAULT 'pending',
        result TEXT
    );

    -- fleet: credit escrow (micro-credits)
    CREATE TABLE credit_accounts (
        customer_id TEXT PRIMARY KEY REFERENCES customers(id),
        balance BIGINT NOT NULL DEFAULT 0,
        settled BIGINT NOT NULL DEFAULT 0,
        escrowed BIGINT NOT NULL DEFAULT 0 CHECK (escrowed >= 0)
    );
    CREATE TABLE credit_leases (
        id BIGSERIAL PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES credit_accounts(customer_id),
        member_id TEXT NOT NULL,
        granted BIGINT NOT NULL CHECK (granted >= 0),
        reported BIGINT NOT NULL DEFAULT 0 CHECK (reported >= 0 AND reported <= granted),
        expires_at TIMESTAMPTZ NOT NULL,
        state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'closed', 'expired')),
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE UNIQUE INDEX credit_leases_one_active ON credit_leases(customer_id, member_id)
        WHERE state = 'active';
    CREATE INDEX credit_leases_expiry ON credit_leases(expires_at) WHERE state = 'active';

    CREATE TABLE members (
        id TEXT PRIMARY KEY,
        last_shipped_seq BIGINT NOT NULL DEFAULT 0,
        last_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
        rules_version TEXT NOT NULL DEFAULT '',
        started_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    -- one row per usage item of a journal row; (member_id, seq) makes a resend a no-op
    CREATE TABLE usage_ledger (
        customer_id TEXT NOT NULL,
        member_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        item SMALLINT NOT NULL,
        request_id TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        rule TEXT NOT NULL,
        rules_version TEXT NOT NULL,
        status INTEGER NOT NULL,
        method TEXT NOT NULL DEFAULT '',
        path TEXT NOT NULL DEFAULT '',
        meter TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        credits BIGINT NOT NULL DEFAULT 0,
        billable BIGINT NOT NULL DEFAULT 0,
        flags TEXT NOT NULL DEFAULT '',
        shipped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (customer_id, member_id, seq, item)
    );
    CREATE INDEX usage_ledger_time ON usage_ledger(customer_id, at_ms);
    CREATE INDEX usage_ledger_request ON usage_ledger(request_id);

    -- one row per duty (e.g. 'flusher'): who holds it, until when, and its fence
    CREATE TABLE leader_leases (
        duty TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        fence BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    """,
)
