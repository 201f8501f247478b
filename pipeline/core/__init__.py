"""What the engine and the workers share: the store, gold masks, metrics and the stage registry."""
