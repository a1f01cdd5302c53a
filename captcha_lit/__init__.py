"""captcha_lit: train, evaluate and deploy deep-learning solvers for text CAPTCHAs.

The package root stays import-light on purpose: the torch-free runtime and the
data-generation workers import submodules without pulling in torch.
"""

__version__ = "0.1.0"
