"""`nanoseek speedrun`: the whole R1 recipe end to end (run.py), and the report card it writes (report.py)."""
