"""Session fixtures: tiny models really trained, exported and quantized once per test session."""
