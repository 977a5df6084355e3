"""The internal HTTP API (CONTRACT §7) on Quart-Trio served by Hypercorn."""
