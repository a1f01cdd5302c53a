"""The labeling page: ``python -m captcha_lit.label path=DIR [ckpt_path=PATH]``.

rules.py (what a label may be), store.py (labels.csv, atomic and shared between tabs and
processes), order.py (which image comes next), session.py (a folder, its model readings and
its labels), app.py (the FastAPI app and its page in static/), server.py (the entry point).
"""
