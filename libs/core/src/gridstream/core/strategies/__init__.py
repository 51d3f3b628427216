"""Strategies: events in, order intents out."""
