"""Adapters for training libraries; each submodule imports its library, if any, only itself."""
