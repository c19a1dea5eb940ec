"""Prepaid credits: a pure ledger (``ledger``), the in-memory book the hot path uses
(``book``), and the persistence/service layer (``service``)."""
