"""hal0: a control plane for local AI inference.

Slots own their models; the API routes OpenAI-shaped requests to them and explains every decision.
"""

__version__ = "0.1.0"
