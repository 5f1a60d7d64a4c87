"""A model as plain data, nothing loaded: its skeleton on the meta device, its blocks, their KV and activation sizes."""
