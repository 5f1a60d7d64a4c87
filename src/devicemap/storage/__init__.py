"""Files on disk: safetensors read and written, model folders, checkpoint names, offload files, the demo model."""
