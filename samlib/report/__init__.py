"""The report layer around the samlib core: notebook parameters and summary.json (params), runs,
tables, figures, the HTML index, notebook upkeep, the Kaggle submission and the speed benchmark.
The report imports the core; the core never imports the report."""
