"""Evaluation: presets and settings (`presets`), ranked groups (`groups`), protocol math (`protocol`),
weighted accuracies (`stats`) and the `evaluate` command (`command`). See docs/evaluation.md."""
