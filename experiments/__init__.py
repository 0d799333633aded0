"""Applications built on normkit's public API; not part of the normkit wheel."""
