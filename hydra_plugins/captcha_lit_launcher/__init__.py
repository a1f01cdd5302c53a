"""Hydra instantiates launchers only from the ``hydra_plugins`` namespace; captcha_lit's live here
as thin subclasses of their code in ``captcha_lit.training``."""
