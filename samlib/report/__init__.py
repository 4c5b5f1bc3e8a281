"""What the notebooks call around the samlib core: their parameters and summary.json (params),
the runs (runs), tables, figures, the HTML index (html), the Kaggle submission (submit), Colab
(colab).  The report imports the core; the core never imports the report."""
