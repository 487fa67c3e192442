"""split tables (filled in by the split flow)."""

DDL = ""
