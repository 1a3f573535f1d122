"""Few-label evaluation (``gigassl evaluate``): the protocol's labels, budgets and seeded
splits; the one method × budget × split loop every task runs (classification, survival,
regression), each with its methods and metrics; the baselines on tile features (AverageMIL, attention-MIL, top-k) and how they are
trained; paired comparisons with intervals; survival (Cox, C-index, Kaplan–Meier) and
regression targets; and the printed tables, files and plots of the results.
"""
