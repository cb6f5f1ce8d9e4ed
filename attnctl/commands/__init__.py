"""The engine's own sub-commands (registered under the ``attnctl.commands`` entry points)."""
