"""Builders: make or download datasets in the layouts the readers read (never run by opening a reader)."""
