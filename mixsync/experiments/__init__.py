"""Experiment results: Split exposures joined to the Mixpanel events that followed them, with their statistics."""
