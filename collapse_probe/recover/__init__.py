"""Recovery forensics: does the tool skill survive a collapse, hidden behind the format? `recover.run` runs
the probes (format grid, masked decoding, SFT repair) on one checkpoint."""
