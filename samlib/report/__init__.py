"""The report layer: what the notebooks need around the method in the samlib core.

params (notebook parameters, header, summary.json), runs (train / read / evaluate runs),
tables (Table 1, Figure 1, discrepancies), figures (matplotlib), html (the index page),
notebooks (output stripping, upkeep), submit (the Kaggle CSV), bench (naive vs samlib
speed).  The report imports the core; the core never imports the report.
"""
