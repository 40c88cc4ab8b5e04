"""Figures and tables drawn from the results store (nothing here runs a model).

    compare.py   runs as the comparison tools see them (RunData), curves against any cost axis, side-by-side grids
    plots.py     one run's figures: the reward curve and the sample grids (written atomically)
    table.py     paper tables: Markdown, LaTeX (booktabs), CSV
    report.py    one self-contained HTML page: curves, table, grids, run configs
    fd_tables.py the Frechet-distance-against-NFE tables and figure of a run or a sweep
    credit.py    the DDE credit weights' figure
"""
