"""Flagsmith: Mixpanel cohort membership as identity traits."""
