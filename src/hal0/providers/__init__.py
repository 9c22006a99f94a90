"""Providers: how to start and probe one kind of backend; data plus pure functions, no processes."""
