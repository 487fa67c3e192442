"""impressions tables (filled in by the impressions flow)."""

DDL = ""
