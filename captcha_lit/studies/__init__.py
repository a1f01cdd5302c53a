"""Studies that run many trainings and report on them: the audit of a CAPTCHA scheme."""
