"""attnbench harness: config schema, sweep job, timing, memory, records, report, CLI."""
