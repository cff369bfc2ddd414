"""Readers and writers for logit dumps. `open_source(path)` picks the reader by content."""
