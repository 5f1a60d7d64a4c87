"""A model on devices: its tensors put in place, hooks at block boundaries, offloaded weights fetched ahead."""
