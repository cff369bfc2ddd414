"""Statistics over per-token and per-prompt arrays (numpy/scipy; no compiled code)."""
