"""StreamDiT core library: pure PyTorch, no ComfyUI imports.

Modules: ``schedule`` (partition and noise-level maths), ``config`` / ``model`` / ``attention`` (the
backbone), ``text`` (the bundled text encoder), ``checkpoint`` (safetensors I/O), ``prompts`` (schedules),
``stream`` (state), ``sampler`` (the moving buffer), ``v2v`` (video input), ``pipeline`` (loading),
``video_io`` (MP4/WEBP/PNG writers), ``world`` / ``evaluate`` (the procedural world and its evaluator),
``train`` (training and distillation), ``cli`` (command line).
"""

__version__ = "0.1.0"
