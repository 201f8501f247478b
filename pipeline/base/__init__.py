"""Error types and content hashes: the ground every layer, the stages included, stands on."""
