"""Secrets kept out of everything hal0 shows or writes: API answers, events, logs, pidfiles.

Environment entries with a secret-looking name and the value of a secret-taking backend flag become `***`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MASK = "***"
#: A name with any of these in it, in any case, is a secret's.
_SECRET_WORDS = ("token", "key", "secret", "passw", "auth", "credential", "cookie")
#: Backend flags whose next argument (or `=value`) is a secret: llama-server's and the HF tools'.
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "-hft", "--token", "--password"})


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in env.items()}


def redact_argv(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            out.append(MASK)
        elif eq and flag in SECRET_FLAGS:
            out.append(f"{flag}={MASK}")
        else:
            out.append(arg)
        hide_next = not hide_next and arg in SECRET_FLAGS
    return out
