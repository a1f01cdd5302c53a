"""Architectures. Importing this package registers every built-in model."""

from captcha_lit.models import cnn, crnn, resnet  # noqa: F401  (registration side effects)
from captcha_lit.models.registry import get_model, list_models, model_decoder, model_options, register_model

__all__ = ["get_model", "list_models", "model_decoder", "model_options", "register_model"]
