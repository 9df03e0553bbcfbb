"""Scores: Dice at patch and whole-slide level, the KPIs challenge protocol, object-level F1, statistics."""
