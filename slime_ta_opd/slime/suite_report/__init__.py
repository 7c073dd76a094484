"""A method suite's report: summary.csv/md with paired bootstrap CIs and verdicts (``summary``), plots (``plots``)."""
