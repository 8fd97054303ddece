"""ipixmatch: being written (issue 4). Registers nothing yet."""
TERMS: dict = {}
FAMILIES: dict = {}
PRESETS: dict = {}
