"""Mixpanel: raw export and cohorts into DuckDB, and exposures back through /import."""
