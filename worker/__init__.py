"""The llamaq worker: engine, scheduler, KV bookkeeping, Redis intake and publisher, service and CLI."""
