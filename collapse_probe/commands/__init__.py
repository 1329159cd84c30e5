"""The commands' work: analyze, watch, report, demo."""
