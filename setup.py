"""`pip install .`: toist_core, training and the Python part of toist_ros, without ROS.

Training machines have no ROS: this installs the model, data, evaluation and training code
and the `toist` command. The ROS 2 node additionally needs the generated messages, which
`colcon build` of this same directory produces (see README, "On a robot").
"""

from setuptools import find_packages, setup

setup(
    name="toist",
    version="0.1.0",
    description="Task-oriented instance segmentation (TOIST) for robots: model, training, ROS 2 node",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["toist_core", "toist_core.*", "training", "training.*",
                                    "toist_ros", "toist_ros.*"]),
    package_data={
        "toist_core": ["assets/*/*", "assets/*/*/*", "data/*.json", "configs/*.yaml"],
        "training": ["configs/*.yaml"],
    },
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals
        "torchvision>=0.20",
        "transformers>=4.45",  # tokenizers >= 0.20 for the packaged tokenizers
        "numpy>=1.21.5",  # Ubuntu 22.04 (ROS 2 Humble); docs/robot.md
        "scipy",
        "pycocotools>=2.0.7",
        "faster-coco-eval>=1.8",  # the evaluator's default backend (pycocotools stays the reference)
        "opencv-python-headless",
        "numba>=0.55.1",  # the compiled kernel of toist_ros's 3D step (toist_ros/depth/geometry_kernel.py)
        "pyyaml",
        "safetensors>=0.4.3",
        "tensorboard",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"demo": ["scikit-image"], "test": ["pytest"],
                    # toist export --onnx and backend onnxruntime / tensorrt (onnxruntime-gpu for TensorRT)
                    "onnx": ["onnx", "onnxscript", "onnxruntime"]},
    entry_points={"console_scripts": ["toist = toist_core.cli:main"]},
)
