"""The operator's commands, one module each: they read status.json and access.log (never
discover on their own) and render into an injectable rich Console."""
