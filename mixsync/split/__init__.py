"""Split: Mixpanel events to the Events API."""
