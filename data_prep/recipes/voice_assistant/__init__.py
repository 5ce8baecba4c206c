"""The synthetic voice-assistant corpus (grammar + speech synthesizers)."""
