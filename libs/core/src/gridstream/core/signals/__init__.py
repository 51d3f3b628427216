"""Signals: indicators per symbol and interval, incremental (engine) and batch (frame)."""
