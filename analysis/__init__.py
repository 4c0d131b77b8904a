"""Figures, tables and a report (report.md, report.html) of a study's results.

``python -m analysis --study <study folder> --out <folder>``

Reads only the study folder's Parquet tables and study.json, with pandas,
pyarrow, matplotlib and seaborn (optuna, when installed, for hyperparameter
importance): no torch, no Ray, no GPU. Importing this package imports nothing
heavy; the work is in ``analysis.load`` (reading, with the contract of
``study.results.contract``), ``analysis.build`` (writing) and ``analysis.tradeoffs``
(the Pareto front of fidelity against vividness, what helped, how fast).
"""
