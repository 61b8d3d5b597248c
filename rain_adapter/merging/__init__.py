"""merging: the RAIN-Merging build pipeline behind ``rain build`` (calibration → features → Stage 1 → Stage 2 → compression)."""
