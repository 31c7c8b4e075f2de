"""Callbacks that report a framework's training loop through btune's reporting API (``btune.step``, ``phase``,
``meta``): ``btune.integrations.transformers.BtuneCallback`` for the Hugging Face Trainer and
``btune.integrations.lightning.BtuneCallback`` for Lightning.

Each module imports its framework (and so torch) itself; ``import btune`` never imports this package.
"""
