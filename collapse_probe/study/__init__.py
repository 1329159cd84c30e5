"""The paper's comparison of supervisory signals: a grid of runs (grid.py), its table and claims (report.py), its figures (figures.py)."""
