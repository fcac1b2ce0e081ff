"""Files and directories at the bottom of the package graph: atomic writes, safetensors, on-disk layouts."""
