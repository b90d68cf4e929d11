"""Checkpoint conversion into `RecurrentGemmaBackbone`."""
