"""Where audit entries go: one module per sink."""
