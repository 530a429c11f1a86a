"""Records → the answer: results.csv, fits, crossovers, the pick, tables, plots, the HTML page and
`compare`. Reads records only; never imports harness.run. The columns that name a setting, and
which of them vary, are defined once in columns.py; numbers are written by harness/units.py."""
