"""Tools for people, not used by production paths: the local Ray + MLflow stack and the demo."""
