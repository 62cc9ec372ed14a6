"""continual-opd: fine-tune on your documents, then win back general skills with on-policy distillation."""

__version__ = "0.1.0"
