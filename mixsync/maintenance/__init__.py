"""Warehouse upkeep: the warehouse_maintenance asset and its daily schedule (no external system)."""
