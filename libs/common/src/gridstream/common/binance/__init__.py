"""Binance spot protocol: REST and websocket payloads, signing, filters, errors."""
