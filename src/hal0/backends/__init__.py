"""Small OpenAI-shaped servers hal0 ships for backends that have no server of their own.

Each runs as `python -m hal0.backends.<name>_server --host H --port N --model PATH`, started by its provider.
"""
