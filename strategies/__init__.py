"""Built-in attnctl strategies. Each module is a pluggy plugin registered through the
``attnctl.strategies`` entry-point group, exactly as a third-party plugin would be."""
