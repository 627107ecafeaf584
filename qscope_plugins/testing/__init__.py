"""Test helpers shipped with the package: tiny random-weight models that need no network."""
