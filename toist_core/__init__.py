"""toist_core: the TOIST network, its losses and distillation, data, evaluation and inference.

Plain PyTorch; importing it never imports ROS.
"""

__version__ = "0.1.0"
