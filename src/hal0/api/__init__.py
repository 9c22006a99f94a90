"""The HTTP edge: /v1 (OpenAI-shaped dispatcher), /api (management), / (dashboard)."""
