"""Running one job: the point's identity and config, its lifecycle and ownership, its ranks, stop
signals, and the record it writes while it trains."""
