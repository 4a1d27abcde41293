"""Data: files in the reference demo's format (or alpaca / sharegpt) → checked conversations → tokenized samples."""
