"""diffbench harness: the backend-agnostic core (cases, models, timing, memory, parity, records, gate)."""
