from setuptools import find_packages, setup

setup(
    name="hpc_asr",
    version="0.1.0",
    description="Conformer-CTC speech recognition trained the HPC way (MPI, Horovod, HDF5)",
    packages=find_packages(include=["hpc_asr", "hpc_asr.*", "data_prep", "data_prep.*"]),
    package_data={"hpc_asr": ["configs/*.yaml"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["hpc-asr = hpc_asr.__main__:main"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.26",
        "h5py>=3.10",
        "mpi4py>=3.1",
        "jiwer>=3.0",
        "soundfile>=0.12",
        "miniaudio>=1.59",
        "soxr>=0.3",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "kaldi-native-fbank>=1.20",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
        "flashlight-text>=0.0.7",  # beam search + KenLM (hpc_asr.decode.ctc)
        "sentencepiece>=0.2",  # train.tokenizer: bpe
        "pyroomacoustics>=0.7",  # data_prep.augment
        "fastapi>=0.110",  # hpc_asr.deploy.serve
        "uvicorn>=0.30",
        "websockets>=13",
        "prometheus-client>=0.20",
    ],
    extras_require={"horovod": ["horovod==0.28.1"], "tensorboard": ["tensorboard"], "peer": ["pocketsphinx>=5.0"],
                    "serve-peer": ["sherpa-onnx>=2.0"],
                    "test": ["pytest>=8", "lhotse>=1.20", "ruff", "httpx", "playwright"]},
)
