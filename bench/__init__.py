"""deep3m benchmarks: each module prints its figures and the ratio to its baseline."""
