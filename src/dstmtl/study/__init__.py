"""Multi-task studies: every method x every seed on any dataset (the optional ``study`` part).

* :mod:`dstmtl.study.weighting`: UW, DWA, RLW and FAMO for partly labelled data.
* :mod:`dstmtl.study.statistics`: intervals over seeds, paired tests, Δm%, mean ranks.

``import dstmtl`` never imports this package.
"""
