"""Examples of lightning_msr: LightningCLI scripts and the `make demo` script (run them from the repository root)."""
