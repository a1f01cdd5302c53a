"""The sweep summary, now ``captcha_lit.report``; kept so that existing commands and configs work.

    python -m captcha_lit.summary SWEEP_DIR      # the same as python -m captcha_lit.report SWEEP_DIR
"""

from captcha_lit.report import SweepSummaryCallback, collect, main, to_markdown, write_report

__all__ = ["SweepSummaryCallback", "collect", "main", "to_markdown", "write_report"]

if __name__ == "__main__":
    main()
