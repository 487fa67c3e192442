"""Split impressions: webhook receiver, landing files, and exposures to Mixpanel."""
