"""The call-syntax layer: how tool calls are written, parsed, validated and classified, in one place."""
