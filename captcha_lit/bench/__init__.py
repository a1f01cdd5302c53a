"""`make bench`: accuracy and speed benchmarks (``python -m captcha_lit.bench --help``)."""
