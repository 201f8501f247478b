"""The pure functions the stages are made of: arrays and config in, arrays out."""
