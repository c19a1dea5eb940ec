"""SQLite schema and migrations, applied in order by ``Store.open``.

``PRAGMA user_version`` records how many migrations ran. Migrations only ever append;
an applied migration is never edited.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: customers, keys, usage aggregates, per-request audit
    """
    CREATE TABLE customers (
        id TEXT PRIMARY KEY,
        stripe_customer_id TEXT,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
        overage TEXT NOT NULL DEFAULT 'bill' CHECK (overage IN ('bill', 'block')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES customers(id),
        name TEXT NOT NULL DEFAULT '',
        hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX api_keys_customer ON api_keys(customer_id);
    -- quantities are integer micro-units (1 unit = 1e6); billable = not covered by credits;
    -- reported = how much of billable the flusher has moved into the outbox
    CREATE TABLE usage_minute (
        customer_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        minute INTEGER NOT NULL,
        rules_version TEXT NOT NULL,
        quantity INTEGER NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0,
        billable INTEGER NOT NULL DEFAULT 0,
        covered INTEGER NOT NULL DEFAULT 0,
        reported INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (customer_id, key_id, meter, minute, rules_version)
    ) WITHOUT ROWID;
    CREATE INDEX usage_minute_time ON usage_minute(minute);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        customer_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        rule TEXT NOT NULL,
        rules_version TEXT NOT NULL,
        status INTEGER NOT NULL,
        meter TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        credits INTEGER NOT NULL DEFAULT 0,
        billable INTEGER NOT NULL DEFAULT 0,
        flags TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_customer_time ON audit(customer_id, at_ms);
    CREATE INDEX audit_request ON audit(request_id);
    CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
    """,
    # 2: the Stripe outbox. Rows are minted (with their identifier) before any call is made.
    """
    ALTER TABLE usage_minute ADD COLUMN reported_covered INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        identifier TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        event_name TEXT NOT NULL,
        covered INTEGER NOT NULL DEFAULT 0,
        value INTEGER NOT NULL,
        window_start INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        sent_at INTEGER,
        sink TEXT,
        outcome TEXT,
        last_error TEXT,
        dead_at INTEGER
    );
    CREATE INDEX outbox_status ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_customer ON outbox(customer_id, meter, timestamp);
    -- fractional units not yet reported, per customer and event name (micro-units)
    CREATE TABLE carry (
        customer_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        event_name TEXT NOT NULL,
        remainder INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (customer_id, meter, event_name)
    ) WITHOUT ROWID;
    INSERT INTO meta(k, v) VALUES ('install_id', lower(hex(randomblob(6))));
    """,
    # 3: prepaid credits (append-only grants and entries), alerts, inbound webhooks
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES customers(id),
        amount INTEGER NOT NULL CHECK (amount > 0),
        priority INTEGER NOT NULL DEFAULT 50,
        expires_at INTEGER,
        source TEXT NOT NULL,
        idempotency_key TEXT,
        created_at INTEGER NOT NULL,
        period_start INTEGER,
        period_end INTEGER,
        UNIQUE (customer_id, idempotency_key)
    );
    CREATE INDEX grants_customer ON grants(customer_id);
    -- append-only; amount > 0 takes credits out of a grant (debit, expire, void);
    -- kind 'refund' (amount < 0) would put them back
    CREATE TABLE credit_entries (
        seq INTEGER PRIMARY KEY,
        customer_id TEXT NOT NULL,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        kind TEXT NOT NULL CHECK (kind IN ('debit', 'expire', 'void', 'refund')),
        amount INTEGER NOT NULL,
        request_id TEXT,
        meter TEXT,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX credit_entries_grant ON credit_entries(grant_id);
    CREATE INDEX credit_entries_customer ON credit_entries(customer_id, at_ms);
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        customer_id TEXT NOT NULL,
        period_key TEXT NOT NULL,
        threshold TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead', 'logged')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        sent_at INTEGER,
        UNIQUE (customer_id, period_key, threshold)
    );
    CREATE INDEX alerts_due ON alerts(status, next_attempt_at);
    CREATE TABLE webhook_events (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        created INTEGER,
        payload TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        processed_at INTEGER,
        status TEXT NOT NULL DEFAULT 'pending',
        result TEXT
    );
    CREATE INDEX outbox_timestamp ON outbox(timestamp);
    -- only rows with usage not yet staged: staging and flush lag never scan history
    CREATE INDEX usage_minute_unreported ON usage_minute(minute)
        WHERE billable > reported OR covered > reported_covered;
    ALTER TABLE customers ADD COLUMN enforcement TEXT NOT NULL DEFAULT 'enforce';
    """,
    # 4: billing periods, request identity in the audit, every rules version kept for disputes
    """
    ALTER TABLE customers ADD COLUMN billing_anchor INTEGER;
    ALTER TABLE customers ADD COLUMN minimum_commitment INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE audit ADD COLUMN method TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit ADD COLUMN path TEXT NOT NULL DEFAULT '';
    CREATE TABLE rules_versions (
        version TEXT PRIMARY KEY,
        first_loaded_at INTEGER NOT NULL,
        files TEXT NOT NULL
    );
    """,
    # 5: the strict-durability journal: one cheap append per group commit; rows move into
    # audit / usage_minute / credit_entries in batches (Store.materialize)
    """
    CREATE TABLE journal (seq INTEGER PRIMARY KEY, row BLOB NOT NULL);
    """,
    # 6: the outbox state 'dry_run': events the dry-run sink only logged are not 'sent'
    # (a real sink delivers them later). SQLite cannot alter a CHECK: the table is rebuilt.
    # Rows an earlier version marked 'sent' through the dry-run sink were never delivered.
    """
    CREATE TABLE outbox_v6 (
        id INTEGER PRIMARY KEY,
        identifier TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL,
        meter TEXT NOT NULL,
        event_name TEXT NOT NULL,
        covered INTEGER NOT NULL DEFAULT 0,
        value INTEGER NOT NULL,
        window_start INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'sent', 'dead', 'dry_run')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        sent_at INTEGER,
        sink TEXT,
        outcome TEXT,
        last_error TEXT,
        dead_at INTEGER
    );
    INSERT INTO outbox_v6 (id, identifier, customer_id, meter, event_name, covered, value,
        window_start, timestamp, created_at, status, attempts, next_attempt_at, sent_at, sink,
        outcome, last_error, dead_at)
    SELECT id, identifier, customer_id, meter, event_name, covered, value, window_start,
        timestamp, created_at, status, attempts, next_attempt_at, sent_at, sink, outcome,
        last_error, dead_at FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_v6 RENAME TO outbox;
    CREATE INDEX outbox_status ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_customer ON outbox(customer_id, meter, timestamp);
    CREATE INDEX outbox_timestamp ON outbox(timestamp);
    UPDATE outbox SET status = 'dry_run', sent_at = NULL, attempts = 0, outcome = 'dry_run'
        WHERE status = 'sent' AND sink = 'dry_run';
    """,
    # 7: the credit lifecycle (docs/credits.md): debt and its repayment in the append-only
    # ledger (a debt entry has no grant), the payments grants came from (refunds, disputes
    # and credit notes claw back), and why a customer is suspended
    """
    CREATE TABLE credit_entries_v7 (
        seq INTEGER PRIMARY KEY,
        customer_id TEXT NOT NULL,
        grant_id TEXT REFERENCES grants(id),
        kind TEXT NOT NULL CHECK (kind IN ('debit', 'expire', 'void', 'refund', 'debt', 'repay')),
        amount INTEGER NOT NULL,
        request_id TEXT,
        meter TEXT,
        at_ms INTEGER NOT NULL,
        CHECK ((kind = 'debt') = (grant_id IS NULL))
    );
    INSERT INTO credit_entries_v7(seq, customer_id, grant_id, kind, amount, request_id, meter,
        at_ms) SELECT seq, customer_id, grant_id, kind, amount, request_id, meter, at_ms
        FROM credit_entries;
    DROP TABLE credit_entries;
    ALTER TABLE credit_entries_v7 RENAME TO credit_entries;
    CREATE INDEX credit_entries_grant ON credit_entries(grant_id);
    CREATE INDEX credit_entries_customer ON credit_entries(customer_id, at_ms);
    CREATE TABLE grant_payments (
        ref TEXT NOT NULL,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        paid INTEGER NOT NULL,
        PRIMARY KEY (ref, grant_id)
    ) WITHOUT ROWID;
    -- a payment (payment intent / charge) -> the invoice it paid, from invoice_payment.paid
    -- or invoice.payments (API 2025-03-31 on: neither Invoice nor Charge names the other)
    CREATE TABLE payment_links (
        payment_ref TEXT NOT NULL,
        invoice_ref TEXT NOT NULL,
        PRIMARY KEY (payment_ref, invoice_ref)
    ) WITHOUT ROWID;
    CREATE TABLE clawbacks (
        key TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        minor INTEGER NOT NULL,
        credits INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    ALTER TABLE customers ADD COLUMN suspended_for TEXT;
    """,
    # 8: the billing lifecycle (docs/credits.md, issue 12 findings 1, 8, 9): a grant's
    # effective time, each subscription invoice a plan grant waits on or was paid by, and
    # the time of the subscription event that last set the billing anchor
    """
    ALTER TABLE grants ADD COLUMN effective_at INTEGER;
    ALTER TABLE customers ADD COLUMN anchor_event_at INTEGER;
    ALTER TABLE grants ADD COLUMN carried INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE plan_invoices (
        invoice_id TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        customer_id TEXT NOT NULL,
        subscription TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'paid', 'unpaid')),
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX plan_invoices_grant ON plan_invoices(grant_id);
    -- each ended period's minimum-commitment true-up, decided once (proxy/commitments.py)
    CREATE TABLE trueups (
        customer_id TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        period_end INTEGER NOT NULL,
        commitment INTEGER NOT NULL,
        charged INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('none', 'sent')),
        invoice_item TEXT,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (customer_id, period_start)
    );
    """,
    # 9: the currency a customer is charged in (a price's currency_options, docs/credits.md)
    """
    ALTER TABLE customers ADD COLUMN currency TEXT;
    """,
    # 10: the monetary credits mode (docs/credits.md): a customer's mode, and each local
    # grant's Stripe credit grant mirror (proxy/credits/mirror.py; owner proxy/store/mirrors.py)
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
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX grant_mirrors_due ON grant_mirrors(status, next_attempt_at);
    """,
    # 11: journal sequence numbers are never reused (AUTOINCREMENT): a process that moves
    # its own committed rows checks, by their seqs, that the journal still holds exactly
    # those (Store._materialize_mirrored); a seq reused after another process emptied the
    # journal would pass that check with different rows
    """
    CREATE TABLE journal_new (seq INTEGER PRIMARY KEY AUTOINCREMENT, row BLOB NOT NULL);
    INSERT INTO journal_new (seq, row) SELECT seq, row FROM journal;
    DROP TABLE journal;
    ALTER TABLE journal_new RENAME TO journal;
    """,
    # 12: the monetary credits mode: the latest usage-period end of an invoice Stripe
    # finalized, per customer (``invoice.finalized``), so a Stripe grant kept live past its
    # local expiry for that invoice is voided after a restart too (owner proxy/store/mirrors.py)
    """
    CREATE TABLE invoice_finalized (
        customer_id TEXT PRIMARY KEY,
        period_end INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
    # 13: journal seqs are still never reused, without AUTOINCREMENT (whose sqlite_sequence
    # update was a second WAL frame on every group commit): ``journal_seq.hwm`` is at least
    # every seq ever deleted from the journal (the delete trigger keeps it so, whoever
    # deletes), a new row takes max(max(seq), hwm) + 1 (``proxy.store.db._JOURNAL_INSERT``),
    # and the insert trigger moves a row inserted at or below hwm above it, e.g. an older
    # version's (``INSERT INTO journal(row)``: SQLite picks max(seq) + 1, which may be a
    # used seq once the journal was emptied) during a rolling upgrade: its commit succeeds
    # with a fresh seq, and its in-memory copy no longer matching, it reads the journal back.
    # The hwm starts at AUTOINCREMENT's count.
    """
    CREATE TABLE journal_seq (id INTEGER PRIMARY KEY CHECK (id = 0), hwm INTEGER NOT NULL);
    INSERT INTO journal_seq (id, hwm) VALUES (0, max(
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0),
        coalesce((SELECT max(seq) FROM journal), 0)));
    CREATE TABLE journal_new (seq INTEGER PRIMARY KEY, row BLOB NOT NULL);
    INSERT INTO journal_new (seq, row) SELECT seq, row FROM journal;
    DROP TABLE journal;
    ALTER TABLE journal_new RENAME TO journal;
    CREATE TRIGGER journal_seq_deleted AFTER DELETE ON journal
        WHEN OLD.seq > (SELECT hwm FROM journal_seq WHERE id = 0)
    BEGIN
        UPDATE journal_seq SET hwm = OLD.seq WHERE id = 0;
    END;
    CREATE TRIGGER journal_seq_fresh AFTER INSERT ON journal
        WHEN NEW.seq <= (SELECT hwm FROM journal_seq WHERE id = 0)
    BEGIN
        UPDATE journal SET seq = (SELECT max(max(seq), (SELECT hwm FROM journal_seq
            WHERE id = 0)) + 1 FROM journal) WHERE seq = NEW.seq;
    END;
    """,
    # 14: a commitment true-up's parameters are frozen before its invoice item is created
    # (status ``sending``, with the Stripe customer it is for), so every retry sends the
    # same ones (proxy/commitments.py); the CHECK is widened by rebuilding the table
    """
    CREATE TABLE trueups_new (
        customer_id TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        period_end INTEGER NOT NULL,
        commitment INTEGER NOT NULL,
        charged INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('none', 'sending', 'sent')),
        invoice_item TEXT,
        created_at INTEGER NOT NULL,
        stripe_customer_id TEXT,
        PRIMARY KEY (customer_id, period_start)
    );
    INSERT INTO trueups_new (customer_id, period_start, period_end, commitment, charged, amount,
                             currency, status, invoice_item, created_at)
        SELECT customer_id, period_start, period_end, commitment, charged, amount, currency,
               status, invoice_item, created_at FROM trueups;
    DROP TABLE trueups;
    ALTER TABLE trueups_new RENAME TO trueups;
    """,
    # 15: when an outbox row's first call that Stripe may have applied began (unix seconds;
    # NULL: none yet). Stripe dedupes identifiers over 24 h only, so the flusher resends a
    # row only within its resend horizon of that time (proxy.flusher.RESEND_HORIZON). Rows
    # attempted before this migration get their creation time: at or before their first
    # call, so their horizon ends early, never late.
    """
    ALTER TABLE outbox ADD COLUMN first_attempt_at REAL;
    UPDATE outbox SET first_attempt_at = created_at WHERE attempts > 0 AND status <> 'sent';
    """,
    # 16: fleet mode: the member id whose journal this is (the id its rows ship under, keyed
    # ``(member_id, seq)`` in the shared ledger). A member started on a journal another id
    # wrote ships that journal's remainder under the recorded id before it adopts its own
    # (proxy/fleet/runtime.py, docs/fleet.md "The journal and its member id")
    """
    CREATE TABLE journal_owner (id INTEGER PRIMARY KEY CHECK (id = 0), member_id TEXT NOT NULL);
    """,
    # 17: customers by Stripe customer id (the usage page's shared-customer check on every
    # view, webhooks, reconciliation): an index instead of a scan of every customer
    """
    CREATE INDEX customers_stripe_customer ON customers(stripe_customer_id);
    """,
)
