"""Integrations with training libraries; each submodule imports its library, this package none."""
