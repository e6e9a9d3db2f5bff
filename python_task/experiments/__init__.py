"""Many points: the local sweep runner, the report over a results table, and the end-to-end demo."""
