"""Stage kinds: one module per kind, each registering a plain function with @stage."""
