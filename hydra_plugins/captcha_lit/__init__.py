"""captcha_lit's Hydra plugins. Hydra instantiates a sweeper only from this namespace package, and
imports every module in it at startup, so each module here is a thin, import-light entry."""
