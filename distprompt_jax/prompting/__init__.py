"""Finding prompts: the objective and the soft- and hard-prompt engines."""
