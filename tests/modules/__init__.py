"""Codeunit modules that misbehave at import (the broker imports them at start)."""
