"""flagsmith tables (filled in by the flagsmith flow)."""

DDL = ""
