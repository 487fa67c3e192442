"""mixsync: Mixpanel, Split and Flagsmith in sync through a DuckDB warehouse, orchestrated by Dagster."""

import os

# Landing files, outbox journals, engage pages, impressions and the DuckDB file hold personal data (identifiers,
# e-mail addresses): whatever a mixsync process creates is for its own user only (folders 0700, files 0600).
# Set once, here, because every process that writes them (code server, run workers, the CLI, the receiver)
# imports this package first, and DuckDB creates its files with the process's umask.
os.umask(0o077)
