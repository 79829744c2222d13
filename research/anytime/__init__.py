"""Anytime networks and TIPS path importance: the graph scores (``graph``)."""
