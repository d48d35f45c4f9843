"""Helpers shared by tools, dev scripts and tests: runs, loss balance, stand-in weights, testing."""
