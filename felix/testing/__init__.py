"""Test and benchmark infrastructure shared by tests/ and bench/ (not used at run time)."""
