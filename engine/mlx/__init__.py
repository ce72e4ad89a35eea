"""The MLX backend (Apple Silicon GPU, or the CPU build `mlx[cpu]` on Linux): the same model
phases as `engine.torch`, reading the same safetensors, without torch at run time."""
